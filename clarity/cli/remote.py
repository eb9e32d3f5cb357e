"""`clarity upscale --server URL`: the same command, with the work done by a Clarity server.

`RemoteUpscaler.check` asks the server, through the official `openai` SDK, whether it answers,
takes the key and serves the model, before any image. The images then go as async jobs
(remote_jobs.py); to a server without the jobs API (an older Clarity, another OpenAI-compatible
server), as edit requests through the SDK (`RemoteUpscaler.upscale`), which gets its retries for
free: a 429 (queue full), 503 (model loading, worker restarted) or 408 is retried after the
server's `Retry-After`; a 500 is not (the server says `x-should-retry: false`). A 4xx names
the field, and is reported for that image alone.
"""

from __future__ import annotations

import base64
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clarity.cli.batch import Job

if TYPE_CHECKING:
    import openai

#: Retries of one request that the server answered "busy" or "not ready" (429, 503, 408).
MAX_RETRIES = 8
#: Seconds one request may take, queueing included (the server has its own limits).
REQUEST_TIMEOUT = 3600.0


class RemoteError(Exception):
    """The server refused or failed an image: its message, naming the field when it did."""


class RemoteUpscaler:
    """Upscales image files on a Clarity (or any OpenAI-images-compatible) server at `base_url`."""

    def __init__(self, base_url: str, api_key: str | None, model: str | None = None) -> None:
        import openai

        self.model = model
        self.key_sent = bool(api_key)
        # The SDK insists on a key; a server without --api-key ignores whatever is sent.
        self.client = openai.OpenAI(base_url=f"{base_url.rstrip('/')}/v1", api_key=api_key or "none",
                                    max_retries=MAX_RETRIES, timeout=REQUEST_TIMEOUT)

    def check(self) -> None:
        """Fail fast, before a batch: the server answers, accepts the key, and serves `model`."""
        import openai

        try:
            served = [model.id for model in self.client.with_options(max_retries=2, timeout=30).models.list()]
        except openai.APIStatusError as error:
            raise RemoteError(self._status_message(error)) from None
        except openai.APIConnectionError as error:
            raise RemoteError(f"cannot reach the server at {self.client.base_url}: {error}") from None
        if self.model is not None and self.model not in served:
            raise RemoteError(f"the server does not serve model {self.model!r}; it serves {', '.join(served)}")

    def _status_message(self, error: openai.APIStatusError) -> str:
        """`server answered <status>: <its message>`, and for a 401 whether a key was sent at all."""
        body = error.body if isinstance(error.body, dict) else {}
        message = f"server answered {error.status_code}: {body.get('message') or error.message}"
        if error.status_code == 401:
            hint = ("the key given (--api-key or $CLARITY_API_KEY) was refused" if self.key_sent
                    else "no key was sent: give the server's key with --api-key or $CLARITY_API_KEY")
            message += f" ({hint})"
        return message

    def upscale(self, job: Job, fields: dict[str, str], quality: int | None, mask: Path | None) -> tuple[bytes, str]:
        """The encoded result for `job` (in `job.output_format`) and a one-line description of it.

        `fields` are the engine parameters to send (form text, as the user gave them), with
        `prompt` always among them (OpenAI's `prompt` is required); those left out take the
        server's defaults.
        """
        import openai

        extra: dict[str, Any] = {**fields, "output_format": job.output_format}
        if quality is not None:
            extra["output_compression"] = quality
        prompt = extra.pop("prompt")
        optional = {"model": self.model} if self.model else {}
        try:
            with open(job.source, "rb") as image, (open(mask, "rb") if mask else contextlib.nullcontext()) as mask_file:
                if mask_file is not None:
                    optional["mask"] = mask_file
                response = self.client.images.edit(
                    image=image, prompt=prompt, response_format="b64_json", extra_body=extra, **optional
                )
        except openai.APIStatusError as error:
            raise RemoteError(self._status_message(error)) from None
        except openai.APIConnectionError as error:
            raise RemoteError(f"cannot reach the server: {error}") from None
        data = response.data[0]
        # `seed` is Clarity's addition to OpenAI's image object; the SDK keeps unknown fields.
        return base64.b64decode(data.b64_json), f"{response.size} on the server; seed {getattr(data, 'seed', None)}"
