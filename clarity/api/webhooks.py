"""Job webhooks: a job's `webhook_url` and `webhook_events` checked when it is submitted, and its events
delivered there signed as Standard Webhooks, retried with backoff until they arrive or time runs out.

The job runner holds one `WebhookSender` built from `ServerConfig.webhook_secret`, `webhook_allow` and
`webhook_retry_seconds`; it calls `check` on a submission's fields (a `ParamError`, so a 400 naming the
field, when they are wrong or the server sends no webhooks), `send` for each event the job asked for,
and `aclose` at shutdown. The `standardwebhooks` library, which receivers verify with, signs: one
signature per configured secret, so that a secret can be rotated without a gap. Targets must be on the
operator's allow-list, checked at submission and again (names resolved anew) before every try.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import logging
import random
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple

import httpx2 as httpx
from standardwebhooks import Webhook

from clarity import __version__
from clarity.api.metrics import record_webhook_delivery
from clarity.errors import ParamError, echo
from clarity.params import did_you_mean

logger = logging.getLogger(__name__)

#: Events a job may send, in the order they happen; a job names a subset in `webhook_events`.
WEBHOOK_EVENTS = ("started", "progress", "completed")
#: What a job that names a webhook_url but no webhook_events is sent.
DEFAULT_WEBHOOK_EVENTS = ("completed",)
#: Longest webhook_url accepted, in characters.
MAX_URL_LENGTH = 2048
#: Standard Webhooks secrets: `whsec_` then base64 of 24 to 64 random bytes (fewer than 24 are refused).
SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24
#: Seconds a webhook's host name may take to resolve before the check or the try fails.
RESOLVE_SECONDS = 5.0
USER_AGENT = f"Clarity/{__version__} (webhooks)"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# One DNS label; underscores too, as container and service names use them.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
# What a webhook-id may hold: it travels in a header and receivers keep it to drop repeats.
_MESSAGE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,200}")


# --- what a job may ask for ------------------------------------------------------------------------


def parse_webhook_events(text: str | None) -> tuple[str, ...]:
    """`webhook_events` ("started, completed") as event names in `WEBHOOK_EVENTS` order; empty or None
    means `DEFAULT_WEBHOOK_EVENTS`. An unknown name is a `ParamError` naming it and the accepted ones."""
    names = [part.strip().lower() for part in (text or "").split(",")]
    if not any(names):
        return DEFAULT_WEBHOOK_EVENTS
    for name in names:
        if name not in WEBHOOK_EVENTS:
            raise ParamError("webhook_events", f"unknown event {echo(name)}{did_you_mean(name, WEBHOOK_EVENTS)};"
                             f" expected a comma-separated list of {', '.join(WEBHOOK_EVENTS)}")
    return tuple(event for event in WEBHOOK_EVENTS if event in names)


def parse_webhook_url(url: str) -> httpx.URL:
    """`url` parsed by the client that will send to it: http or https, a host name or address, no
    user name or password, at most `MAX_URL_LENGTH` characters; else a `ParamError` naming webhook_url.
    Says nothing of whether the host is allowed (`check_webhook_url` does)."""
    if len(url) > MAX_URL_LENGTH:
        raise ParamError("webhook_url", f"at most {MAX_URL_LENGTH:,} characters; got {len(url):,}")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as error:
        raise ParamError("webhook_url", f"not a URL: {echo(url)} ({error})") from error
    if parsed.scheme not in ("http", "https"):
        raise ParamError("webhook_url", f"must be an http:// or https:// URL; got {echo(url)}")
    if parsed.userinfo:
        # Not echoed: it holds a password.
        raise ParamError("webhook_url", "must not hold a user name or password (user:password@); deliveries are"
                                        " signed instead (see the webhook-signature header)")
    host = parsed.raw_host.decode("ascii")
    if _address(host) is None and not _HOST_NAME.fullmatch(host):
        raise ParamError("webhook_url", f"needs a host name or IP address; got {echo(url)}")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ParamError("webhook_url", f"port must be 1-65535; got {parsed.port}")
    return parsed


async def check_webhook_url(url: str, allow: tuple[str, ...]) -> str:
    """`url` as it will be requested, if `parse_webhook_url` takes it and the allow-list `allow`
    (`ServerConfig.webhook_allow`) lets webhooks go to its host; else a `ParamError` naming webhook_url."""
    parsed = parse_webhook_url(url)
    if not allow:
        raise ParamError("webhook_url", "this server sends webhooks to no host: its operator has to list the hosts"
                                        " or networks they may go to with --webhook-allow")
    host = parsed.raw_host.decode("ascii")
    try:
        allowed = await _allowed(parsed, AllowList.parse(allow))
    except (OSError, asyncio.TimeoutError) as error:
        raise ParamError("webhook_url", f"cannot resolve the host {echo(host)}") from error
    if not allowed:
        raise ParamError("webhook_url", f"the host {echo(host)} is not on this server's --webhook-allow list (a name"
                                        " must be listed, or resolve only to addresses in listed networks)")
    return str(parsed)


# --- the operator's options ------------------------------------------------------------------------


def is_signing_secret(text: str) -> bool:
    """Whether `text` is a Standard Webhooks secret: `whsec_` then base64 (padded or not) of at least
    `MIN_SECRET_BYTES` bytes. Stricter than the library, which skips characters that are not base64."""
    if not text.startswith(SECRET_PREFIX):
        return False
    encoded = text[len(SECRET_PREFIX):]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        return False
    return len(key) >= MIN_SECRET_BYTES


@dataclass(frozen=True)
class AllowList:
    """Where webhooks may go: `names`, host names allowed as they are (lower case, no final dot), and
    `networks`, which allow addresses inside them and names that resolve only to such addresses."""

    names: frozenset[str]
    networks: tuple[IPNetwork, ...]

    @classmethod
    def parse(cls, entries: tuple[str, ...]) -> AllowList:
        """The list from `--webhook-allow` entries; a `ValueError` naming one that is neither name nor network."""
        names, networks = set(), []
        for entry in entries:
            text = entry.strip().lower()
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                if not _HOST_NAME.fullmatch(text) or text.replace(".", "").isdigit():
                    raise ValueError(f"expected host names, addresses or networks; got {echo(entry)}") from None
                names.add(text.rstrip("."))
        return cls(frozenset(names), tuple(networks))

    def holds(self, address: IPAddress) -> bool:
        """Whether `address` is inside a listed network."""
        return any(address in network for network in self.networks)


def _address(text: str) -> IPAddress | None:
    """`text` as an IP address (an IPv4-mapped IPv6 address as the IPv4 one it reaches), or None."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


async def _allowed(url: httpx.URL, allow: AllowList) -> bool:
    """Whether `allow` lets webhooks go to `url`'s host; names outside `allow.names` are resolved
    when there are networks to check their addresses against (`OSError` or a timeout if that fails).

    The client resolves the name again when it connects: a name whose DNS answer changes in between
    (DNS rebinding) can still reach an address the check did not see. Redirects are never followed.
    """
    host = url.raw_host.decode("ascii").rstrip(".")
    address = _address(host)
    if address is not None:
        return allow.holds(address)
    if host in allow.names:
        return True
    if not allow.networks:
        return False
    addresses = await _resolve(host, url.port or (443 if url.scheme == "https" else 80))
    return bool(addresses) and all(allow.holds(address) for address in addresses)


async def _resolve(host: str, port: int) -> set[IPAddress]:
    """Every address `host` resolves to (the system resolver, in a thread), within `RESOLVE_SECONDS`."""
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_SECONDS)
    return {address for info in infos if (address := _address(str(info[4][0]))) is not None}


# --- delivery ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookTarget:
    """A submitted job's webhook, checked: the URL its events go to and the events it asked for."""

    url: str
    events: tuple[str, ...]


@dataclass(frozen=True)
class Backoff:
    """Seconds between the tries of one delivery: `first`, doubling with each failed try up to
    `longest`, each drawn between half and all of that so that many receivers' retries spread out."""

    first: float = 1.0
    longest: float = 300.0

    def delay(self, failed_tries: int) -> float:
        """The wait after the `failed_tries`-th failed try (1 for the first)."""
        ceiling = min(self.first * 2.0 ** min(failed_tries - 1, 60), self.longest)
        return random.uniform(ceiling / 2, ceiling)


DEFAULT_BACKOFF = Backoff()


@dataclass(frozen=True)
class _Message:
    """One event to deliver: `id` is its webhook-id (the same on every try), `body` the signed JSON."""

    id: str
    url: httpx.URL
    type: str
    body: str
    #: Called with the outcome when the delivery ends for good (not when it is cancelled at shutdown).
    on_end: Callable[[str], None] | None = None

    @property
    def host(self) -> str:
        """What the logs name of the target: the host only, as a URL's path or query may hold a token."""
        return self.url.host


class _Try(NamedTuple):
    """How one try ended: `outcome` is delivered, gone or refused (no more tries) or failed; `detail` says why."""

    outcome: str
    detail: str


#: Outcomes after which a message is tried no more (the rest of `record_webhook_delivery`'s words are
#: gave_up, dropped and cancelled).
_FINAL = ("delivered", "gone", "refused")


class WebhookSender:
    """Delivers job events to their webhooks, in the background of the running event loop.

    `secrets` are `whsec_` secrets, each of which signs every delivery (none: `check` refuses every
    webhook); `allow` is the allow-list (`ServerConfig.webhook_allow`); a delivery is retried with
    `backoff` until it succeeds, is refused for good, or `retry_seconds` have passed since it was sent.
    At most `max_concurrent` requests are in flight and `max_pending` deliveries held (beyond that
    `send` drops the event with an error logged); one try may take `try_seconds`.
    """

    def __init__(
        self, secrets: tuple[str, ...], allow: tuple[str, ...], retry_seconds: float, *,
        backoff: Backoff = DEFAULT_BACKOFF, max_concurrent: int = 16, max_pending: int = 10_000,
        try_seconds: float = 30.0,
    ) -> None:
        self.allow, self.retry_seconds, self.backoff = allow, retry_seconds, backoff
        self.max_pending, self.try_seconds = max_pending, try_seconds
        self._allow = AllowList.parse(allow)
        self._signers = tuple(Webhook(secret) for secret in secrets)
        # Straight to the target: no redirects (they could lead off the allow-list), no proxy from the environment.
        self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=try_seconds,
                                         headers={"user-agent": USER_AGENT})
        self._slots = asyncio.Semaphore(max_concurrent)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    async def check(self, url: str | None, events: str | None) -> WebhookTarget | None:
        """A submission's `webhook_url` and `webhook_events` fields, checked: None when it names no webhook,
        else its target; a `ParamError` naming the field when they are wrong or this server sends no webhooks."""
        if not url:
            if events:
                raise ParamError("webhook_events", "given without a webhook_url to send the events to")
            return None
        if not self._signers:
            raise ParamError("webhook_url", "this server sends no webhooks: its operator has set no signing secret"
                                            " (--webhook-secret or $CLARITY_WEBHOOK_SECRET)")
        return WebhookTarget(await check_webhook_url(url, self.allow), parse_webhook_events(events))

    def send(self, url: str, event: str, data: dict[str, Any], message_id: str | None = None,
             on_end: Callable[[str], None] | None = None) -> bool:
        """Deliver the event `job.<event>` with `data` to `url` (a `WebhookTarget.url`) in the background,
        and return at once; call it on the event loop's thread. `message_id` is its webhook-id, by which
        receivers drop repeats (default: a new random one); `data` must be JSON-serialisable. The URL's
        form is checked here (`parse_webhook_url`), its host before every try. `on_end(outcome)` is called
        on the loop when the delivery has ended for good (delivered, gone, refused, gave_up), not when it
        is cancelled at shutdown. Returns whether it was taken: False when it was dropped (too many pending,
        or shutting down; logged)."""
        if event not in WEBHOOK_EVENTS:
            raise ValueError(f"unknown webhook event {event!r}")
        if not self._signers:
            raise RuntimeError("no webhook secret to sign with: check() refuses every webhook_url")
        message_id = message_id or f"msg_{uuid.uuid4().hex}"
        if not _MESSAGE_ID.fullmatch(message_id):
            raise ValueError(f"a webhook-id is 1-200 letters, digits and _.:-; got {message_id!r}")
        message = _Message(message_id, parse_webhook_url(url), f"job.{event}", _body(f"job.{event}", data), on_end)
        if self._closing or len(self._tasks) >= self.max_pending:
            why = "the server is shutting down" if self._closing else f"{self.max_pending:,} deliveries are pending"
            logger.error("webhook %s %s to %s dropped: %s", message.type, message.id, message.host, why)
            record_webhook_delivery("dropped")
            return False
        task = asyncio.get_running_loop().create_task(self._deliver(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    @property
    def pending(self) -> int:
        """Deliveries not finished yet (trying, or waiting to try again)."""
        return len(self._tasks)

    async def aclose(self, timeout: float) -> None:
        """Stop taking events, give the pending deliveries up to `timeout` seconds to finish, cancel
        the rest (each logged), and close the HTTP client."""
        self._closing = True
        if self._tasks:
            _, unfinished = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        await self._client.aclose()

    async def _deliver(self, message: _Message) -> None:
        """Try `message` until a final outcome or until the next try would start past `retry_seconds`."""
        deadline, tries = time.monotonic() + self.retry_seconds, 0
        try:
            while True:
                tries += 1
                result = await self._try(message)
                if result.outcome in _FINAL:
                    break
                delay = self.backoff.delay(tries)
                if time.monotonic() + delay > deadline:
                    result = _Try("gave_up", f"{result.detail}; retried for {self.retry_seconds:g} s")
                    break
                logger.info("webhook %s %s to %s: try %d failed (%s); again in %.1f s", message.type, message.id,
                            message.host, tries, result.detail, delay)
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            _log_end(message, _Try("cancelled", "the server shut down"), tries)
            raise
        _log_end(message, result, tries)
        if message.on_end is not None:
            try:
                message.on_end(result.outcome)
            except Exception:  # the sender outlives any one callback
                logger.exception("webhook %s %s: recording its end failed", message.type, message.id)

    async def _try(self, message: _Message) -> _Try:
        """One try: the host checked against the allow-list again (names resolved anew), then one POST."""
        try:
            if not await _allowed(message.url, self._allow):
                return _Try("refused", "its host is not allowed by --webhook-allow any more")
            async with self._slots:
                status = await asyncio.wait_for(self._post(message), self.try_seconds)
        except (httpx.TransportError, OSError, asyncio.TimeoutError) as error:
            return _Try("failed", f"{type(error).__name__} {error}".strip())
        if 200 <= status < 300:
            return _Try("delivered", f"status {status}")
        if status == 410:
            return _Try("gone", "410 Gone: the receiver wants no more")
        return _Try("failed", f"status {status}")

    async def _post(self, message: _Message) -> int:
        """POST `message`, freshly signed, and return the status; the response body is never read."""
        async with self._client.stream("POST", message.url, content=message.body.encode(),
                                       headers=self._signed_headers(message)) as response:
            return response.status_code

    def _signed_headers(self, message: _Message) -> dict[str, str]:
        """Standard Webhooks' headers for a try now: one `v1,` signature per secret, space-separated
        (receivers accept the message if any verifies with their secret)."""
        now = datetime.now(timezone.utc).replace(microsecond=0)
        signatures = " ".join(signer.sign(message.id, now, message.body) for signer in self._signers)
        return {"webhook-id": message.id, "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": signatures, "content-type": "application/json"}


def _body(event_type: str, data: dict[str, Any]) -> str:
    """The JSON every delivery carries: the event's type, when it happened (ISO 8601, UTC) and its data."""
    timestamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return json.dumps({"type": event_type, "timestamp": timestamp, "data": data}, separators=(",", ":"),
                      allow_nan=False)


def _log_end(message: _Message, result: _Try, tries: int) -> None:
    """Log and count how a delivery ended: delivered at debug level, the rest as warnings or errors."""
    level = {"delivered": logging.DEBUG, "gone": logging.WARNING, "cancelled": logging.WARNING}.get(
        result.outcome, logging.ERROR)
    logger.log(level, "webhook %s %s to %s %s after %d tr%s: %s", message.type, message.id, message.host,
               result.outcome.replace("_", " "), tries, "y" if tries == 1 else "ies", result.detail)
    record_webhook_delivery(result.outcome)
