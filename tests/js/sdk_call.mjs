// One call of the official OpenAI JavaScript SDK against a Clarity server, as an app makes it.
// Usage: node sdk_call.mjs BASE_URL API_KEY IMAGE_PATH REQUEST_JSON
// Prints one JSON line: the response (with its request id), or the error the SDK raised; with
// "stream": true in the request, every event of the stream as the SDK yields it (`for await`).
import fs from "node:fs";
import OpenAI, { toFile } from "openai";

const [baseURL, apiKey, imagePath, requestJson] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const image = await toFile(fs.createReadStream(imagePath), "photo.png", { type: "image/png" });
try {
  const request = JSON.parse(requestJson);
  if (request.stream) {
    const stream = await client.images.edit({ image, prompt: "a photo", ...request });
    const events = [];
    for await (const event of stream) events.push(event);
    console.log(JSON.stringify({ ok: true, events }));
    process.exit(0);
  }
  // Clarity's own fields travel next to OpenAI's, as the SDK passes unknown body fields through.
  const { data, request_id } = await client.images
    .edit({ image, prompt: "a photo", ...request })
    .withResponse();
  console.log(JSON.stringify({ ok: true, response: data, request_id }));
} catch (error) {
  if (!(error instanceof OpenAI.APIError)) throw error;
  console.log(JSON.stringify({ ok: false, class: error.constructor.name, status: error.status,
                               param: error.param, code: error.code, message: error.message }));
}
