// The Clarity playground. It builds its form from playground/params.json (the server's description of
// UpscaleParams, clarity/params.py: no second list of parameters here), calls the public API with the
// key the user typed, streams the upscale (Server-Sent Events read from fetch: EventSource cannot
// POST), and compares the result with the original. No framework, no build step, nothing from elsewhere.

const $ = (id) => document.getElementById(id);
/** Where the key is kept: this tab only, gone when it closes. */
const KEY_STORAGE = "clarity.apiKey";
/** The API's base, relative to the page, so the page also works behind a path prefix. */
const API = new URL("v1/", document.baseURI);
/** How many partial previews the stream is asked for. */
const PARTIAL_IMAGES = 2;
/** Parameters whose values the server chooses when sent as "none" (a random seed). */
const NONE = "none";
/** The type `serverSentEvents` gives a comment line (no event can have it: event names have no spaces). */
const COMMENT = "(comment)";

const state = {
  /** playground/params.json: {parameters, output_formats, input_formats}. */
  description: null,
  /** The picked image (a File), an object URL of it, and whether this browser can show it (not TIFF). */
  file: null,
  originalUrl: null,
  originalShown: false,
  /** The result's object URL. */
  resultUrl: null,
  /** Aborts the running upscale (Cancel). */
  controller: null,
};

// --- start ----------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", start);

async function start() {
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE) ?? "";
  wireEvents();
  try {
    state.description = await (await fetch(new URL("playground/params.json", document.baseURI))).json();
  } catch (error) {
    showBanner(`Could not load the parameter description: ${error.message}`);
    return;
  }
  renderForm(state.description);
  await loadModels();
}

function wireEvents() {
  $("form").addEventListener("submit", run);
  $("cancel").addEventListener("click", () => state.controller?.abort());
  $("reset").addEventListener("click", () => renderForm(state.description));
  $("api-key").addEventListener("input", () => sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim()));
  $("api-key").addEventListener("change", loadModels);
  $("image").addEventListener("change", () => $("image").files[0] && pickImage($("image").files[0]));
  wireDropzone($("dropzone"));
  $("slider").addEventListener("input", showSlider);
  wireComparePointer($("compare"));
  $("zoom").addEventListener("change", applyZoom);
  $("copy-curl").addEventListener("click", () => copy($("curl-code").textContent, "curl command"));
  $("copy-python").addEventListener("click", () => copy($("python-code").textContent, "Python code"));
}

// --- the form, from params.json -------------------------------------------------------------------

/** Fill the output formats and every parameter, at their defaults. */
function renderForm(description) {
  $("input-formats").textContent = description.input_formats.join(", ");
  const formats = $("output_format");
  formats.replaceChildren(...description.output_formats.map((format) => new Option(format.name, format.name)));
  $("common-params").replaceChildren();
  $("advanced-params").replaceChildren();
  for (const param of description.parameters) {
    $(param.advanced ? "advanced-params" : "common-params").append(renderParameter(param));
  }
}

/** One parameter's field: label, control(s) at the default, its range and meaning, a place for errors. */
function renderParameter(param) {
  const id = `param-${param.name}`;
  const field = element("div", { className: "field", dataset: { param: param.name } });
  const label = element("label", { htmlFor: id, id: `${id}-label`, textContent: param.name });
  const help = element("p", { id: `${id}-help`, className: "hint", textContent: `${param.help} ${limits(param)}` });
  const error = element("p", { id: `${id}-error`, className: "field-error", hidden: true });
  const control = makeControl(param, id);
  control.setAttribute("aria-describedby", `${help.id} ${error.id}`);
  if (param.type === "boolean") {
    field.classList.add("checkbox");
    field.append(control, label, help, error);
  } else if (hasSlider(param)) {
    const slider = makeSlider(param, control, label.id);
    field.append(label, element("div", { className: "slider-row" }, [slider, control]), help, error);
  } else {
    field.append(label, control, help, error);
  }
  return field;
}

/** The control that holds a parameter's value (its `name` is the form field's). */
function makeControl(param, id) {
  const common = { id, name: param.name };
  if (param.type === "boolean") return element("input", { ...common, type: "checkbox", checked: param.default });
  if (param.choices.length) {
    const select = element("select", common, param.choices.map((choice) => new Option(choice, choice)));
    select.value = param.default;
    return select;
  }
  if (param.type === "string") {
    if (!param.max_length) return element("input", { ...common, type: "text", value: param.default, spellcheck: false });
    return element("textarea", { ...common, value: param.default, spellcheck: false, maxLength: param.max_length, rows: 2 });
  }
  const control = element("input", { ...common, type: "number", step: "any", value: param.default ?? "" });
  control.inputMode = param.type === "integer" ? "numeric" : "decimal";
  if (param.min !== null) control.min = param.min;
  if (param.max !== null) control.max = param.max;
  if (param.nullable) control.placeholder = NONE;
  return control;
}

/** Decimal numbers (not integers) with both bounds also get a slider, kept in step with the box. */
function hasSlider(param) {
  return param.type === "number" && param.min !== null && param.max !== null;
}

function makeSlider(param, box, labelId) {
  const step = 10 ** Math.floor(Math.log10((param.max - param.min) / 100));
  const slider = element("input", {
    type: "range", min: param.min, max: param.max, step, value: param.default, className: "param-slider",
  });
  slider.setAttribute("aria-labelledby", labelId);
  slider.addEventListener("input", () => { box.value = slider.value; });
  box.addEventListener("input", () => { if (box.value !== "") slider.value = box.value; });
  return slider;
}

/** "0–1, default 0.35", as the README's parameter table says it. */
function limits(param) {
  const parts = [];
  if (param.min !== null && param.max !== null) parts.push(`${param.min}–${param.max}`);
  if (param.nullable) parts.push(`or ${NONE} (empty)`);
  const shown = param.default === null ? NONE : String(param.default);
  parts.push(`default ${param.type === "string" && !param.choices.length ? JSON.stringify(shown) : shown}`);
  return `(${parts.join(", ")})`;
}

/** The parameters as the request sends them: the prompt always (the SDKs require it), the others when
 * they differ from their default, as [name, text] pairs in UpscaleParams' order. */
function changedParameters() {
  const pairs = [];
  for (const param of state.description.parameters) {
    const text = controlText(param);
    if (param.name === "prompt" || !isDefault(param, text)) pairs.push([param.name, text]);
  }
  return pairs;
}

/** A control's value as form text; "" means "the default", and an empty nullable number NONE. */
function controlText(param) {
  const control = $(`param-${param.name}`);
  if (param.type === "boolean") return String(control.checked);
  const text = control.value.trim();
  return text === "" && param.nullable ? NONE : control.type === "number" ? text : control.value;
}

function isDefault(param, text) {
  if (param.type === "boolean") return (text === "true") === param.default;
  if (param.type === "string") return text === param.default;
  return text === "" || (text !== NONE && Number(text) === param.default);
}

// --- the key and the models -----------------------------------------------------------------------

/** The Authorization header, when the user typed a key. */
function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** Fill the model picker from GET /v1/models (which needs the key when the server has one). */
async function loadModels() {
  clearFieldError("api_key");
  let response;
  try {
    response = await fetch(new URL("models", API), { headers: authHeaders() });
  } catch (error) {
    showBanner(`The server cannot be reached: ${error.message}`);
    return;
  }
  if (!response.ok) {
    await showResponseError(response, false);
    return;
  }
  const models = (await response.json()).data.map((model) => model.id);
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren(new Option("Server default", ""), ...models.map((id) => new Option(id, id)));
  select.value = models.includes(chosen) ? chosen : "";
}

// --- the image ------------------------------------------------------------------------------------

function wireDropzone(zone) {
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    const file = event.dataTransfer.files[0];
    if (!file) return;
    $("image").files = event.dataTransfer.files;
    pickImage(file);
  });
}

/** Take `file` as the image to upscale; show it when the browser can decode it (the server reads more). */
function pickImage(file) {
  clearFieldError("image");
  if (state.originalUrl) URL.revokeObjectURL(state.originalUrl);
  state.file = file;
  state.originalUrl = URL.createObjectURL(file);
  state.originalShown = false;
  const thumbnail = $("thumbnail");
  const kilobytes = `${Math.ceil(file.size / 1024)} kB`;
  thumbnail.onload = () => {
    $("image-info").textContent = `${file.name}: ${thumbnail.naturalWidth}×${thumbnail.naturalHeight}, ${kilobytes}`;
    thumbnail.hidden = false;
    state.originalShown = true;
  };
  thumbnail.onerror = () => {
    $("image-info").textContent = `${file.name}, ${kilobytes} (this browser cannot show it; the server may read it)`;
    thumbnail.hidden = true;
  };
  thumbnail.alt = `The image to upscale, ${file.name}`;
  thumbnail.src = state.originalUrl;
}

// --- running an upscale ---------------------------------------------------------------------------

/** POST the form to /v1/images/edits with stream=true and follow its events to the result. */
async function run(event) {
  event.preventDefault();
  clearErrors();
  if (!state.file) {
    showFieldError("image", "Choose an image to upscale first.", true);
    return;
  }
  const request = describeRequest();
  setRunning(true);
  state.controller = new AbortController();
  try {
    setStatus(await upscale(request) ? `Done in ${seconds(request.started)} s.` : "Stopped: see the message.");
  } catch (error) {
    if (error.name === "AbortError") {
      setStatus("Cancelled: the server stops the work.");
    } else {
      showBanner(`The request failed: ${error.message}`);
      setStatus("Stopped: see the message.");
    }
  } finally {
    setRunning(false);
  }
}

/** Send the request and show what comes back; whether a result came. */
async function upscale(request) {
  const response = await fetch(new URL("images/edits", API), {
    method: "POST", headers: authHeaders(), body: requestBody(request), signal: state.controller.signal,
  });
  if (!response.ok) {
    await showResponseError(response, true);
    return false;
  }
  return followStream(response, request);
}

function seconds(since) {
  return ((performance.now() - since) / 1000).toFixed(1);
}

/** What is sent, kept for showing and copying: the model, output format and changed parameters. */
function describeRequest() {
  return {
    fileName: state.file.name,
    model: $("model").value,
    outputFormat: $("output_format").value,
    parameters: changedParameters(),
    hasKey: Boolean(authHeaders().Authorization),
    started: performance.now(),
  };
}

function requestBody(request) {
  const body = new FormData();
  body.append("image", state.file, state.file.name);
  if (request.model) body.append("model", request.model);
  for (const [name, text] of request.parameters) body.append(name, text);
  body.append("output_format", request.outputFormat);
  body.append("response_format", "b64_json");
  body.append("stream", "true");
  body.append("partial_images", String(PARTIAL_IMAGES));
  return body;
}

/** Show each event of the stream as it comes; the last is the result or an error. Whether a result came. */
async function followStream(response, request) {
  // The share of the work done as the bar shows it: a preview taken at 50 % may follow the comment at 51 %.
  let done = 0;
  const advance = (fraction) => {
    done = Math.max(done, fraction);
    setProgress(done);
  };
  setProgress(0);
  setStatus("Upscaling…");
  for await (const { type, data } of serverSentEvents(response.body)) {
    if (type === COMMENT) {
      readComment(data, advance);
      continue;
    }
    const payload = JSON.parse(data);
    if (type === "error") {
      showError(payload.error, 0, true);
      return false;
    }
    if (typeof payload.progress === "number") advance(payload.progress);
    if (type === "image_edit.partial_image") showPartial(payload);
    if (type === "image_edit.completed") {
      showResult(payload, request);
      return true;
    }
  }
  showBanner("The stream ended before the result arrived; the server log may say why.");
  return false;
}

/** Clarity's comment lines, which the SDKs skip: ": queued" first, ": progress 0.420" as the work advances
 * (the share done, given to `advance`), ": keep-alive" when there is nothing else to say. */
function readComment(text, advance) {
  const [word, value] = text.trim().split(/\s+/);
  if (word === "queued") setStatus("Waiting for a free worker…");
  if (word === "progress" && Number.isFinite(Number(value))) {
    setStatus("Upscaling…");
    advance(Number(value));
  }
}

/** The events of a Server-Sent Events body, as {type, data}, comment lines as {type: COMMENT, data: text};
 * data lines joined, lines ended by CRLF, LF or CR (a CR at the end of a chunk waits for a possible LF). */
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  let event = { type: "", data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    pending += value ?? (done ? "\n\n" : "");
    const cut = !done && pending.endsWith("\r") ? pending.length - 1 : pending.length;
    const lines = pending.slice(0, cut).split(/\r\n|\r|\n/);
    pending = lines.pop() + pending.slice(cut);
    for (const line of lines) {
      if (line === "") {
        if (event.data.length) yield { type: event.type || "message", data: event.data.join("\n") };
        event = { type: "", data: [] };
      } else if (line.startsWith(":")) {
        yield { type: COMMENT, data: line.slice(1) };
      } else {
        const [field, text] = splitField(line);
        if (field === "event") event.type = text;
        if (field === "data") event.data.push(text);
      }
    }
    if (done) return;
  }
}

/** "name: value" as [name, value], one space after the colon dropped (the SSE format's rule). */
function splitField(line) {
  const colon = line.indexOf(":");
  if (colon < 0) return [line, ""];
  const text = line.slice(colon + 1);
  return [line.slice(0, colon), text.startsWith(" ") ? text.slice(1) : text];
}

function setRunning(running) {
  $("run").disabled = running;
  $("cancel").hidden = !running;
  $("progress-box").hidden = !running && $("progress").value === 0;
  if (running) {
    $("partial-box").hidden = true;
    $("result").hidden = true;
    $("output-heading").scrollIntoView({ block: "nearest" });  // below the form on a phone
  }
}

function setProgress(fraction) {
  $("progress-box").hidden = false;
  $("progress").value = fraction;
  $("progress-text").textContent = `${Math.round(fraction * 100)} %`;
}

function setStatus(text) {
  $("status").textContent = text;
}

/** A partial preview (the upscale's estimate so far), in the output format. */
function showPartial(event) {
  const format = outputFormat(event.output_format);
  $("partial").src = `data:${format.media_type};base64,${event.b64_json}`;
  const progress = typeof event.progress === "number" ? `, at ${Math.round(event.progress * 100)} %` : "";
  $("partial-caption").textContent = `Partial preview ${event.partial_image_index + 1} of ${PARTIAL_IMAGES}` +
    ` (${event.size}${progress})`;
  $("partial-box").hidden = false;
}

function outputFormat(name) {
  return state.description.output_formats.find((format) => format.name === name);
}

// --- the result -----------------------------------------------------------------------------------

/** The finished upscale: compare view, what was used, download and code to do it again. */
function showResult(event, request) {
  const format = outputFormat(event.output_format);
  if (state.resultUrl) URL.revokeObjectURL(state.resultUrl);
  state.resultUrl = URL.createObjectURL(base64Blob(event.b64_json, format.media_type));
  setProgress(1);
  $("partial-box").hidden = true;
  const used = { ...request, seed: event.seed, size: event.size, outputFormat: event.output_format };
  $("after").src = state.resultUrl;
  $("before").src = state.originalUrl;
  // Without a picture of the original (a format this browser cannot show), there is nothing to compare.
  $("before").hidden = !state.originalShown;
  $("divider").hidden = !state.originalShown;
  $("slider-box").hidden = !state.originalShown;
  $("result").hidden = false;
  applyZoom();
  showSlider();
  showUsed(used, seconds(request.started), event.revised_prompt);
  const download = $("download");
  download.href = state.resultUrl;
  download.download = `${stem(request.fileName)}_upscaled.${event.output_format}`;
  $("curl-code").textContent = curlCommand(used);
  $("python-code").textContent = pythonCode(used);
}

function base64Blob(b64, type) {
  const bytes = Uint8Array.from(atob(b64), (char) => char.charCodeAt(0));
  return new Blob([bytes], { type });
}

function stem(fileName) {
  return fileName.replace(/\.[^.]*$/, "") || "image";
}

/** The seed and the parameters used, as a definition list. */
function showUsed(used, time, revisedPrompt) {
  const rows = [
    ["Size", used.size], ["Seed", String(used.seed)], ["Model", used.model || "server default"],
    ["Output format", used.outputFormat], ["Prompt used", revisedPrompt ?? ""],
    ...used.parameters.filter(([name]) => name !== "prompt" && name !== "seed"),
    ["Other parameters", "their defaults"], ["Time", `${time} s`],
  ];
  $("result-info").replaceChildren(...rows.flatMap(([term, value]) => [
    element("dt", { textContent: term }), element("dd", { textContent: value }),
  ]));
}

/** Form fields that repeat the upscale: model, changed parameters, the seed it used, format. */
function replayFields(used) {
  const fields = [];
  if (used.model) fields.push(["model", used.model]);
  fields.push(...used.parameters.filter(([name]) => name !== "seed"));
  fields.push(["seed", String(used.seed)], ["output_format", used.outputFormat]);
  return fields;
}

function curlCommand(used) {
  const quote = (text) => `'${text.replaceAll("'", "'\\''")}'`;
  const lines = [`curl -sS ${new URL("images/edits", API)}`];
  if (used.hasKey) lines.push(`-H "Authorization: Bearer $CLARITY_API_KEY"`);
  lines.push(`-F image=@${quote(used.fileName)}`);
  // --form-string: a value starting with @ or < is text, not a file to attach.
  lines.push(...replayFields(used).map(([name, text]) => `--form-string ${quote(`${name}=${text}`)}`));
  lines.push("--form-string response_format=b64_json");
  const output = `${stem(used.fileName)}_upscaled.${used.outputFormat}`;
  return `${lines.join(" \\\n  ")} \\\n  | jq -r '.data[0].b64_json' | base64 -d > ${quote(output)}`;
}

function pythonCode(used) {
  const fields = replayFields(used);
  const prompt = fields.find(([name]) => name === "prompt")?.[1] ?? "";
  const extra = fields.filter(([name]) => !["model", "prompt"].includes(name));
  const model = used.model ? `\n    model=${pythonString(used.model)},` : "";
  const key = used.hasKey ? 'os.environ["CLARITY_API_KEY"]' : '"unused"';
  const output = `${stem(used.fileName)}_upscaled.${used.outputFormat}`;
  return [
    "import base64", ...(used.hasKey ? ["import os"] : []), "", "from openai import OpenAI", "",
    `client = OpenAI(base_url=${pythonString(API.href.replace(/\/$/, ""))}, api_key=${key})`,
    `result = client.images.edit(${model}`,
    `    image=open(${pythonString(used.fileName)}, "rb"),`,
    `    prompt=${pythonString(prompt)},`,
    '    response_format="b64_json",',
    `    extra_body={${extra.map(([name, text]) => `"${name}": ${pythonValue(name, text)}`).join(", ")}},`,
    ")",
    `with open(${pythonString(output)}, "wb") as file:`,
    "    file.write(base64.b64decode(result.data[0].b64_json))",
  ].join("\n");
}

/** A form value as a Python literal of the parameter's type. */
function pythonValue(name, text) {
  const param = state.description.parameters.find((candidate) => candidate.name === name);
  if (!param || param.type === "string") return pythonString(text);
  if (param.type === "boolean") return text === "true" ? "True" : "False";
  return text === NONE ? "None" : String(Number(text));
}

/** JSON's string syntax is also Python's. */
function pythonString(text) {
  return JSON.stringify(text);
}

// --- the compare view -----------------------------------------------------------------------------

/** Reveal the original left of the slider's position, the upscale right of it. */
function showSlider() {
  const value = Number($("slider").value);
  $("before").style.setProperty("clip-path", `inset(0 ${100 - value}% 0 0)`);
  $("divider").style.setProperty("left", `${value}%`);
  $("slider-text").textContent = `${value} % original`;
  $("slider").setAttribute("aria-valuetext", `${value} % original, ${100 - value} % upscaled`);
}

/** Dragging on the picture with a mouse moves the slider too (a finger pans a zoomed picture; the slider
 * below is for fingers). */
function wireComparePointer(compare) {
  const follow = (event) => {
    const box = compare.getBoundingClientRect();
    const value = Math.round(Math.min(Math.max((event.clientX - box.left) / box.width, 0), 1) * 100);
    $("slider").value = value;
    showSlider();
  };
  compare.addEventListener("pointerdown", (event) => {
    if (event.pointerType !== "mouse") return;
    compare.setPointerCapture(event.pointerId);
    follow(event);
  });
  compare.addEventListener("pointermove", (event) => {
    if (compare.hasPointerCapture(event.pointerId)) follow(event);
  });
}

/** Both layers share one box: fitted to the page, or the result's pixels times the zoom. */
function applyZoom() {
  const zoom = $("zoom").value;
  const compare = $("compare");
  const after = $("after");
  const width = zoom === "fit" ? "" : `${after.naturalWidth * Number(zoom)}px`;
  compare.style.setProperty("width", width);
  if (!after.complete) after.addEventListener("load", applyZoom, { once: true });
}

// --- errors ---------------------------------------------------------------------------------------

/** An error answer before the stream started: OpenAI's {"error": {...}} body, or its status. */
async function showResponseError(response, moveFocus) {
  let error = null;
  try {
    error = (await response.json()).error;
  } catch {
    // Not JSON (a proxy's page): the status says what there is to say.
  }
  const fallback = { message: `The server answered ${response.status} ${response.statusText}.` };
  showError(error ?? fallback, response.status, moveFocus);
}

/** The server's message next to the field it names (`error.param`), else at the top; a 401 is the key's.
 * `moveFocus`: after the user's own action (Upscale), the field in error takes the focus. */
function showError(error, status, moveFocus) {
  if (status === 401) {
    const typed = Boolean(authHeaders().Authorization);
    const advice = typed ? "The key above is not this server's (--api-key or CLARITY_API_KEY)."
      : "This server needs an API key: enter it above.";
    showFieldError("api_key", `${error.message} ${advice}`, moveFocus);
    return;
  }
  const field = error.param && document.querySelector(`[data-param="${CSS.escape(error.param)}"]`);
  if (field) showFieldError(error.param, error.message, moveFocus);
  else showBanner(error.param ? `${error.message} (field: ${error.param})` : error.message);
}

function showFieldError(param, message, moveFocus) {
  const field = document.querySelector(`[data-param="${CSS.escape(param)}"]`);
  const error = field.querySelector(".field-error");
  error.textContent = message;
  error.hidden = false;
  field.classList.add("invalid");
  const details = field.closest("details");
  if (details) details.open = true;
  // The control holding the value (a number's box, not its slider).
  if (moveFocus) (field.querySelector("[name]") ?? field.querySelector("input, select, textarea")).focus();
}

function clearFieldError(param) {
  const field = document.querySelector(`[data-param="${CSS.escape(param)}"]`);
  field.classList.remove("invalid");
  field.querySelector(".field-error").hidden = true;
}

function clearErrors() {
  $("banner").hidden = true;
  for (const field of document.querySelectorAll("[data-param].invalid")) clearFieldError(field.dataset.param);
}

function showBanner(message) {
  $("banner").textContent = message;
  $("banner").hidden = false;
}

// --- small helpers --------------------------------------------------------------------------------

/** Copy `text` to the clipboard; without the Clipboard API (a page not on https or localhost), through
 * a selected text area. */
async function copy(text, what) {
  try {
    if (navigator.clipboard) {
      await navigator.clipboard.writeText(text);
    } else {
      const area = element("textarea", { value: text, className: "offscreen" });
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    $("copy-status").textContent = `Copied the ${what}.`;
  } catch (error) {
    $("copy-status").textContent = `Could not copy (${error.message}); select it below instead.`;
  }
}

/** A new element with properties (dataset merged) and children. */
function element(tag, properties = {}, children = []) {
  const node = document.createElement(tag);
  const { dataset, ...rest } = properties;
  Object.assign(node, rest);
  Object.assign(node.dataset, dataset ?? {});
  node.append(...children);
  return node;
}
