"""The playground page at `/`: its files and parameter description served without the key, and the page
used in a real browser (headless Chromium from Debian's `chromium` package, driven by Playwright) against a
real server process with an API key, on the tiny model.

Without /usr/bin/chromium the browser tests fail, saying how to install it (the README's test command does).
Screenshots before and after an upscale go to tests/artifacts/ (ignored by git).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, ServerProcess
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright

from clarity.api.http import is_open
from clarity.imageio import OUTPUT_FORMATS
from clarity.params import COMMON_PARAMS, param_fields

CHROMIUM = Path("/usr/bin/chromium")
KEY = "sk-playground-test"
ARTIFACTS = ROOT / "tests" / "artifacts"
#: A photograph (skimage's "chelsea"), shrunk so that an upscale on two CPU cores takes seconds.
PHOTO_SIZE = (150, 100)
LAPTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
#: What Chromium logs for an answer the page asked for on purpose (the key refused, a bad file).
EXPECTED_STATUS = re.compile(r"Failed to load resource: the server responded with a status of (400|401)\b")
#: Records, from before the page's own script runs, every partial preview and progress value it shows:
#: a fast stream may show and replace them between two of the test's looks at the page.
RECORDER = """
window.__seen = {partials: [], progress: []};
new MutationObserver(() => {
  const partial = document.getElementById("partial");
  const progress = document.getElementById("progress");
  if (partial && partial.src && !window.__seen.partials.includes(partial.src)) window.__seen.partials.push(partial.src);
  if (progress) window.__seen.progress.push(Number(progress.value));
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["src", "value"]});
"""


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    log = tmp_path_factory.mktemp("playground") / "server.log"
    with ServerProcess(tiny_weights, log, ["--api-key", KEY]) as process:
        yield process


@pytest.fixture(scope="module")
def browser() -> Browser:
    if not CHROMIUM.exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's package with `apt-get install -y chromium` "
                    "(the README's test command does); Playwright's own browser download is not used")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "chelsea.jpg"
    Image.open(ROOT / "benchmarks" / "data" / "chelsea.png").convert("RGB").resize(PHOTO_SIZE).save(path, quality=92)
    return path


def open_page(browser: Browser, server: ServerProcess, viewport: dict[str, int] = LAPTOP) -> tuple[Page, list[str]]:
    """The playground in a fresh tab (empty session storage), with the console errors and uncaught
    exceptions it produces, less the logs of answers a test provokes on purpose."""
    context = browser.new_context(viewport=viewport, accept_downloads=True)
    context.add_init_script(RECORDER)
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda message: message.type == "error" and not EXPECTED_STATUS.search(message.text)
            and problems.append(message.text))
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    page.goto(server.url + "/")
    page.wait_for_selector("#param-creativity")
    return page, problems


def enter_key(page: Page, key: str) -> None:
    page.fill("#api-key", key)
    page.press("#api-key", "Tab")  # a change event: the page loads the models with it


def field_error(page: Page, field_id: str) -> str:
    error = page.locator(f"#{field_id}-error")
    error.wait_for(state="visible", timeout=10_000)
    return error.inner_text()


def screenshot(page: Page, name: str) -> None:
    """The top of the page, in the ignored artifacts folder."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=ARTIFACTS / name)


def run_upscale(page: Page) -> str:
    """Press Upscale and wait until the page is done with it; what its status line says then."""
    page.click("#run")
    # Not page.wait_for_function: the page's Content-Security-Policy forbids evaluating strings.
    page.locator("#run:enabled").wait_for(timeout=60_000)
    return page.inner_text("#status")


def shown_errors(page: Page) -> list[str]:
    """The messages shown next to fields."""
    return page.evaluate("[...document.querySelectorAll('.field-error:not([hidden])')].map((e) => e.textContent)")


def decode_data_url(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


# --- serving, without a browser -------------------------------------------------------------------


def test_the_page_and_its_files_are_open_and_load_nothing_from_elsewhere(server):
    page = server.http.get("/")  # no key
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assets = re.findall(r'<(?:script|link)[^>]*?(?:src|href)="([^"]+)"', page.text)
    local = [url for url in assets if not url.startswith("data:")]
    assert local and not [url for url in local if "//" in url or url.startswith("/")], assets  # relative: any prefix
    types = {".js": "text/javascript", ".css": "text/css"}
    for url in local:
        served = server.http.get("/" + url)
        assert served.status_code == 200, url
        assert served.headers["content-type"].startswith(types[Path(url).suffix]), url


def test_the_parameter_description_is_params_py(server):
    description = server.http.get("/playground/params.json").json()  # no key
    by_name = {entry["name"]: entry for entry in description["parameters"]}
    assert list(by_name) == [f.name for f in param_fields()]
    for f in param_fields():
        entry = by_name[f.name]
        assert entry["default"] == f.default, f.name
        assert (entry["min"], entry["max"]) == (f.metadata["min"], f.metadata["max"]), f.name
        assert entry["choices"] == list(f.metadata["choices"] or ()), f.name
        assert entry["help"] == f.metadata["help"], f.name
        assert entry["advanced"] == (f.name not in COMMON_PARAMS), f.name
    assert by_name["seed"]["nullable"] and by_name["seed"]["type"] == "integer"
    assert by_name["creativity"]["type"] == "number" and by_name["pattern"]["type"] == "boolean"
    assert [entry["name"] for entry in description["output_formats"]] == list(OUTPUT_FORMATS)


def test_the_calls_the_page_makes_need_the_key(server):
    assert server.http.get("/v1/models").status_code == 401
    assert server.http.post("/v1/images/edits").status_code == 401
    assert server.http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_every_file_of_the_page_is_package_data():
    """So that a non-editable install (a wheel) serves the page too."""
    entry = re.search(r'^"clarity.api" = (\[.*\])$', (ROOT / "pyproject.toml").read_text(), flags=re.M)
    globs = json.loads(entry[1])  # a TOML list of strings on one line is JSON
    package = ROOT / "clarity" / "api"
    for path in (package / "web").iterdir():
        assert any(path.relative_to(package).match(pattern) for pattern in globs), path


def test_the_root_entry_opens_the_page_alone():
    assert is_open("/") and is_open("/playground/playground.js")
    assert not is_open("/info") and not is_open("/v1/models") and not is_open("/playgroundx")


# --- in the browser -------------------------------------------------------------------------------


def test_upscale_a_photograph_watch_it_compare_and_download(browser, server, photo):
    page, problems = open_page(browser, server)
    assert "needs an API key" in field_error(page, "api-key")  # the models could not be listed without it
    enter_key(page, KEY)
    page.locator("#model option[value='clarity-upscaler']").wait_for(state="attached")
    page.select_option("#model", "clarity-upscaler")
    page.select_option("#output_format", "webp")
    page.set_input_files("#image", photo)
    page.locator("#image-info", has_text=f"chelsea.jpg: {PHOTO_SIZE[0]}×{PHOTO_SIZE[1]}").wait_for()
    page.fill("#param-creativity", "0.5")
    page.click("#advanced summary")
    page.fill("#param-num_inference_steps", "8")  # 4 denoising steps at creativity 0.5
    page.fill("#param-seed", "77")
    screenshot(page, "playground-before.png")

    status = run_upscale(page)
    assert status.startswith("Done"), (status, page.text_content("#banner"), shown_errors(page))
    assert page.locator("#result").is_visible()
    seen = page.evaluate("window.__seen")
    assert seen["partials"], "no partial preview was shown"
    assert all(decode_data_url(url).format == "WEBP" for url in seen["partials"])
    progress = [value for value in seen["progress"] if value > 0]
    assert progress == sorted(progress) and progress[-1] == 1, seen["progress"]
    # The first preview comes at 1/3 of the work: before it, the bar follows the ": progress" comments.
    assert progress[0] < 1 / 3, seen["progress"]
    assert page.locator("#partial-box").is_hidden()

    expected = (PHOTO_SIZE[0] * 2, PHOTO_SIZE[1] * 2)
    assert page.evaluate("(image => [image.naturalWidth, image.naturalHeight])(document.getElementById('after'))") \
        == list(expected)
    before, after = (page.locator(f"#{layer}").bounding_box() for layer in ("before", "after"))
    assert (before["width"], before["height"]) == (after["width"], after["height"])  # the same zoom
    info = page.inner_text("#result-info")
    assert f"{expected[0]}x{expected[1]}" in info and "77" in info and "0.5" in info
    page.focus("#slider")
    for _ in range(20):
        page.keyboard.press("ArrowRight")
    assert page.input_value("#slider") == "70"
    assert page.get_attribute("#before", "style") == "clip-path: inset(0px 30% 0px 0px);"
    screenshot(page, "playground-after.png")

    curl = page.text_content("#curl-code")
    python = page.text_content("#python-code")
    assert "--form-string 'seed=77'" in curl and "--form-string 'creativity=0.5'" in curl and KEY not in curl
    assert '"seed": 77' in python and '"creativity": 0.5' in python and "extra_body" in python
    with page.expect_download() as download:
        page.click("#download")
    downloaded = Image.open(download.value.path())
    assert downloaded.format == "WEBP" and downloaded.size == expected
    assert download.value.suggested_filename == "chelsea_upscaled.webp"
    assert problems == []

    # The copied Python code, run beside the photo, makes the same image (same seed and parameters).
    subprocess.run([sys.executable, "-c", python], cwd=photo.parent, env={**os.environ, "CLARITY_API_KEY": KEY},
                   check=True, timeout=120)
    again = Image.open(photo.parent / "chelsea_upscaled.webp")
    assert np.array_equal(np.asarray(again), np.asarray(downloaded))


def test_a_bad_file_shows_the_servers_message_by_the_image(browser, server):
    page, problems = open_page(browser, server)
    enter_key(page, KEY)
    page.set_input_files("#image", {"name": "notes.png", "mimeType": "image/png", "buffer": b"no image here"})
    assert run_upscale(page).startswith("Stopped")
    assert "not a supported image" in field_error(page, "image")
    assert page.locator("#banner").is_hidden()
    assert problems == []


def test_a_wrong_key_says_so_by_the_key_field(browser, server, photo):
    page, problems = open_page(browser, server)
    enter_key(page, "sk-wrong")
    assert "Incorrect API key provided" in field_error(page, "api-key")
    page.set_input_files("#image", photo)
    assert run_upscale(page).startswith("Stopped")
    message = field_error(page, "api-key")
    assert "Incorrect API key provided" in message and "not this server's" in message
    assert page.evaluate("sessionStorage.getItem('clarity.apiKey')") == "sk-wrong"  # kept for this tab only
    assert problems == []


def test_every_parameter_has_a_labelled_control_and_keyboard_order_follows_the_form(browser, server):
    page, problems = open_page(browser, server)
    for f in param_fields():
        control = page.locator(f"#param-{f.name}")
        assert control.count() == 1, f.name
        in_advanced = page.locator(f"#advanced #param-{f.name}").count() == 1
        assert in_advanced == (f.name not in COMMON_PARAMS), f.name
    unlabelled = page.evaluate("""[...document.querySelectorAll('input, select, textarea')]
        .filter((c) => !c.labels?.length && !c.getAttribute('aria-labelledby')).map((c) => c.id || c.name)""")
    assert unlabelled == []
    focused = "(active => [active.id, getComputedStyle(active).outlineStyle])(document.activeElement)"
    order = []
    for _ in range(6):
        page.keyboard.press("Tab")
        order.append(page.evaluate(focused))
    # The header's link to the API docs, then the form from the top.
    assert [element_id for element_id, _ in order] == ["", "image", "api-key", "model", "output_format", "param-prompt"]
    assert all(outline == "solid" for _, outline in order), order  # the focus is visible
    assert problems == []


DROP = """async ([name, b64]) => {
  const bytes = Uint8Array.from(atob(b64), (char) => char.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], name, {type: "image/jpeg"}));
  document.getElementById("dropzone").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
}"""


def test_a_phone_window_takes_a_dropped_image_and_needs_no_sideways_scrolling(browser, server, photo):
    page, problems = open_page(browser, server, PHONE)
    enter_key(page, KEY)
    page.evaluate(DROP, [photo.name, base64.b64encode(photo.read_bytes()).decode()])
    page.locator("#image-info", has_text=f"chelsea.jpg: {PHOTO_SIZE[0]}×{PHOTO_SIZE[1]}").wait_for()
    assert page.evaluate("document.getElementById('image').files[0].name") == photo.name
    page.click("#advanced summary")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "playground-phone.png", full_page=True)
    assert problems == []

