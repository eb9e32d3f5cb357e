"""Job webhooks: submissions' fields checked, deliveries signed (verified by the `standardwebhooks`
library, as a receiver would), retried, given up, refused and dropped, against a real HTTP receiver
on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from clarity.api import webhooks
from clarity.api.config import ServerConfig
from clarity.api.webhooks import (
    MAX_URL_LENGTH,
    Backoff,
    WebhookSender,
    WebhookTarget,
    check_webhook_url,
    parse_webhook_events,
)
from clarity.errors import ParamError

LOOPBACK = ("127.0.0.1/32",)
#: Tries seconds apart would make the tests slow; these keep the doubling but in hundredths.
FAST = Backoff(first=0.01, longest=0.05)


def new_secret() -> str:
    """A secret as the README says to make one."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class Receiver:
    """A real HTTP server on 127.0.0.1 that answers each POST with the next of `statuses` (the last one
    repeats) and keeps what it received: (path, lower-cased headers, body)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses, self.received = list(statuses), []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's spelling)
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("location", "/elsewhere")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ids(self) -> list[str]:
        return [headers["webhook-id"] for _, headers, _ in self.received]


@pytest.fixture
def receiver_factory() -> Iterator:
    started: list[Receiver] = []

    def start(*statuses: int) -> Receiver:
        started.append(Receiver(list(statuses) or [200]))
        return started[-1]

    yield start
    for receiver in started:
        receiver.server.shutdown()
        receiver.server.server_close()


@pytest.fixture
def outcomes(monkeypatch) -> list[str]:
    """The outcomes the sender counts in clarity_webhook_deliveries_total, in the order deliveries ended."""
    recorded: list[str] = []
    monkeypatch.setattr(webhooks, "record_webhook_delivery", recorded.append)
    return recorded


def deliver(sender: WebhookSender, url: str, event: str = "completed", data: dict | None = None,
            message_id: str | None = None, wait: float = 10.0) -> float:
    """Send one event, wait (at most `wait` s) until its delivery ended, close the sender; the seconds it took."""

    async def scenario() -> float:
        started = time.monotonic()
        sender.send(url, event, data if data is not None else {"id": "job_1"}, message_id)
        while sender.pending and time.monotonic() - started < wait:
            await asyncio.sleep(0.01)
        took = time.monotonic() - started
        await sender.aclose(0)
        return took

    return asyncio.run(scenario())


# --- signing -------------------------------------------------------------------------------------------


def test_a_delivery_arrives_signed_and_verifies(receiver_factory, outcomes):
    secret, receiver = new_secret(), receiver_factory(200)
    sender = WebhookSender((secret,), LOOPBACK, 60)
    deliver(sender, receiver.url, "completed", {"id": "job_1", "status": "succeeded"}, message_id="job_1.completed")

    [(path, headers, body)] = receiver.received
    payload = Webhook(secret).verify(body, headers)
    assert path == "/hook" and headers["webhook-id"] == "job_1.completed"
    assert payload["type"] == "job.completed" and payload["data"] == {"id": "job_1", "status": "succeeded"}
    assert datetime.fromisoformat(payload["timestamp"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0
    assert headers["content-type"] == "application/json" and headers["user-agent"].startswith("Clarity/")
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    assert outcomes == ["delivered"]


def test_two_secrets_sign_so_receivers_with_either_verify(receiver_factory):
    old, new, receiver = new_secret(), new_secret(), receiver_factory(200)
    deliver(WebhookSender((new, old), LOOPBACK, 60), receiver.url)

    [(_, headers, body)] = receiver.received
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert Webhook(old).verify(body, headers)["type"] == "job.completed"
    assert Webhook(new).verify(body, headers)["type"] == "job.completed"
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)


# --- retries -------------------------------------------------------------------------------------------


def test_failed_tries_are_retried_with_the_same_id_until_one_succeeds(receiver_factory):
    secret, receiver = new_secret(), receiver_factory(500, 503, 200, 200)
    deliver(WebhookSender((secret,), LOOPBACK, 60, backoff=FAST), receiver.url, message_id="job_2.completed")

    assert receiver.ids() == ["job_2.completed"] * 3  # and not a fourth after the 200
    bodies = {body for _, _, body in receiver.received}
    assert len(bodies) == 1, "every try carries the same body"
    for _, headers, body in receiver.received:
        Webhook(secret).verify(body, headers)


def test_410_gone_stops_at_once(receiver_factory, caplog, outcomes):
    receiver = receiver_factory(410, 200)
    with caplog.at_level(logging.WARNING, logger="clarity.api.webhooks"):
        deliver(WebhookSender((new_secret(),), LOOPBACK, 60, backoff=FAST), receiver.url)
    assert len(receiver.received) == 1
    assert "gone after 1 try" in caplog.text and outcomes == ["gone"]


def test_redirects_are_not_followed_but_retried(receiver_factory):
    receiver = receiver_factory(307, 200)  # 307: a client that followed it would POST to /elsewhere
    deliver(WebhookSender((new_secret(),), LOOPBACK, 60, backoff=FAST), receiver.url)
    assert [path for path, _, _ in receiver.received] == ["/hook", "/hook"]


def test_a_delivery_is_given_up_after_retry_seconds(receiver_factory, caplog, outcomes):
    receiver = receiver_factory(500)
    sender = WebhookSender((new_secret(),), LOOPBACK, 0.3, backoff=Backoff(first=0.05, longest=0.05))
    with caplog.at_level(logging.ERROR, logger="clarity.api.webhooks"):
        took = deliver(sender, receiver.url, wait=5)
    assert 0.2 < took < 2, "it ends by itself, once the next try would start past retry_seconds"
    assert 3 <= len(receiver.received) <= 12
    assert "gave up after" in caplog.text and "status 500" in caplog.text and outcomes == ["gave_up"]


def test_connection_errors_are_retried_then_given_up(caplog):
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sender = WebhookSender((new_secret(),), LOOPBACK, 0.2, backoff=Backoff(first=0.05, longest=0.05))
    with caplog.at_level(logging.INFO, logger="clarity.api.webhooks"):
        deliver(sender, f"http://127.0.0.1:{port}/hook", wait=5)
    assert "ConnectError" in caplog.text and "try 1 failed" in caplog.text and "gave up" in caplog.text


def test_the_host_is_checked_again_at_delivery(receiver_factory, caplog, outcomes):
    # Accepted when submitted under another list, say, and the list changed since: nothing may be sent.
    receiver = receiver_factory(200)
    url = receiver.url.replace("127.0.0.1", "localhost")
    with caplog.at_level(logging.ERROR, logger="clarity.api.webhooks"):
        deliver(WebhookSender((new_secret(),), ("10.0.0.0/8",), 60, backoff=FAST), url)
    assert receiver.received == []
    assert "refused after 1 try" in caplog.text and outcomes == ["refused"]


# --- bounds and shutdown -------------------------------------------------------------------------------


def test_send_returns_at_once_and_drops_beyond_max_pending(receiver_factory, caplog, outcomes):
    receiver = receiver_factory(200)
    sender = WebhookSender((new_secret(),), LOOPBACK, 60, max_pending=1)

    async def scenario() -> tuple[int, int]:
        sender.send(receiver.url, "started", {"id": "job_3"})
        sender.send(receiver.url, "completed", {"id": "job_3"})
        held = sender.pending, len(receiver.received)  # before this coroutine yields to the loop
        await sender.aclose(5)
        return held

    with caplog.at_level(logging.ERROR, logger="clarity.api.webhooks"):
        held = asyncio.run(scenario())
    assert held == (1, 0), "send only schedules: nothing was sent yet, one delivery pending"
    assert [json.loads(body)["type"] for _, _, body in receiver.received] == ["job.started"]
    assert "job.completed" in caplog.text and "dropped" in caplog.text
    assert outcomes == ["dropped", "delivered"]


def test_aclose_cancels_what_is_still_retrying(receiver_factory, caplog, outcomes):
    receiver = receiver_factory(500)
    sender = WebhookSender((new_secret(),), LOOPBACK, 3600, backoff=Backoff(first=30, longest=30))

    async def scenario() -> float:
        sender.send(receiver.url, "completed", {"id": "job_4"})
        while not receiver.received:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await sender.aclose(0.2)
        sender.send(receiver.url, "completed", {"id": "job_5"})  # after closing: dropped
        return time.monotonic() - started

    with caplog.at_level(logging.WARNING, logger="clarity.api.webhooks"):
        took = asyncio.run(scenario())
    assert 0.15 < took < 2 and sender.pending == 0
    assert "cancelled after 1 try" in caplog.text and "shutting down" in caplog.text
    assert len(receiver.received) == 1 and outcomes == ["cancelled", "dropped"]


def test_send_refuses_what_could_never_be_delivered():
    sender = WebhookSender((new_secret(),), LOOPBACK, 60)
    url = "http://127.0.0.1:9/hook"
    with pytest.raises(ValueError, match="unknown webhook event 'finished'"):
        sender.send(url, "finished", {})
    with pytest.raises(ValueError, match="webhook-id"):
        sender.send(url, "completed", {}, message_id="job 1\r\nx-injected: 1")
    with pytest.raises(ValueError, match="JSON"):
        sender.send(url, "completed", {"progress": float("nan")})
    with pytest.raises(ParamError, match="webhook_url"):
        sender.send("ftp://127.0.0.1/hook", "completed", {})
    assert sender.pending == 0
    asyncio.run(sender.aclose(0))


# --- what a submission may ask for ---------------------------------------------------------------------


def check(url: str, allow: tuple[str, ...]) -> str:
    return asyncio.run(check_webhook_url(url, allow))


@pytest.mark.parametrize(("url", "allow"), [
    ("http://10.1.2.3:8080/hook?job=1", ("10.0.0.0/8",)),
    ("http://127.0.0.1:9/hook", ("127.0.0.1",)),
    ("https://HOOKS.example.com/x", ("hooks.example.com",)),  # a listed name: not resolved
    ("http://[::ffff:10.0.0.1]/", ("10.0.0.0/8",)),  # an IPv4-mapped address is the IPv4 one
    ("http://localhost:9/", ("127.0.0.0/8", "::1/128")),  # resolves only to listed addresses
])
def test_allowed_urls(url, allow):
    assert check(url, allow).startswith(url.split("://")[0].lower())


@pytest.mark.parametrize(("url", "allow", "words"), [
    ("ftp://10.0.0.1/x", ("10.0.0.0/8",), "http:// or https://"),
    ("10.0.0.1/hook", ("10.0.0.0/8",), "http:// or https://"),
    ("http:///hook", ("10.0.0.0/8",), "host name or IP address"),
    ("http://bad\\host/", ("10.0.0.0/8",), "host name or IP address"),
    ("http://10.0.0.1:70000/", ("10.0.0.0/8",), "port must be"),
    ("http://192.168.1.1/hook", ("10.0.0.0/8",), "not on this server's --webhook-allow"),
    ("https://evil.example.com/", ("hooks.example.com",), "not on this server's --webhook-allow"),
    ("http://localhost:9/", ("10.0.0.0/8",), "not on this server's --webhook-allow"),  # resolves outside
    ("http://10.0.0.1/", (), "--webhook-allow"),
    ("http://10.0.0.1/" + "x" * MAX_URL_LENGTH, ("10.0.0.0/8",), f"at most {MAX_URL_LENGTH:,} characters"),
])
def test_refused_urls_name_the_field(url, allow, words):
    with pytest.raises(ParamError) as caught:
        check(url, allow)
    assert caught.value.param == "webhook_url" and words in caught.value.message


def test_a_name_with_any_address_outside_the_networks_is_refused(monkeypatch):
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host != "mixed.test":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in ("10.0.0.5", "192.0.2.1")]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert check("http://mixed.test/", ("10.0.0.0/8", "192.0.2.0/24")) == "http://mixed.test/"
    with pytest.raises(ParamError, match="not on this server's --webhook-allow"):
        check("http://mixed.test/", ("10.0.0.0/8",))


def test_a_url_with_credentials_is_refused_without_repeating_them():
    with pytest.raises(ParamError) as caught:
        check("https://user:hunter2@10.0.0.1/hook", ("10.0.0.0/8",))
    assert caught.value.param == "webhook_url" and "hunter2" not in str(caught.value)


def test_webhook_events():
    assert parse_webhook_events(None) == parse_webhook_events(" ") == ("completed",)
    assert parse_webhook_events("completed, STARTED,started") == ("started", "completed")
    with pytest.raises(ParamError) as caught:
        parse_webhook_events("started,complete")
    assert caught.value.param == "webhook_events"
    assert "'complete'" in caught.value.message and "did you mean 'completed'" in caught.value.message
    assert "started, progress, completed" in caught.value.message
    with pytest.raises(ParamError, match="webhook_events"):
        parse_webhook_events("started,,completed")


def test_check_refuses_webhooks_without_a_secret_and_events_without_a_url():
    async def scenario(sender: WebhookSender, url: str | None, events: str | None) -> WebhookTarget | None:
        try:
            return await sender.check(url, events)
        finally:
            await sender.aclose(0)

    with pytest.raises(ParamError, match="webhook_url: .*--webhook-secret"):
        asyncio.run(scenario(WebhookSender((), LOOPBACK, 60), "http://127.0.0.1/hook", None))
    configured = (new_secret(),), LOOPBACK, 60
    with pytest.raises(ParamError, match="webhook_events: given without a webhook_url"):
        asyncio.run(scenario(WebhookSender(*configured), None, "started"))
    assert asyncio.run(scenario(WebhookSender(*configured), None, None)) is None
    assert asyncio.run(scenario(WebhookSender(*configured), "http://127.0.0.1:9/hook", "progress,started")) == \
        WebhookTarget("http://127.0.0.1:9/hook", ("started", "progress"))


# --- the server's options ------------------------------------------------------------------------------


def test_config_takes_secrets_and_allow_entries_and_names_bad_ones():
    config = ServerConfig(webhook_secret=(new_secret(), new_secret().rstrip("=")),
                          webhook_allow=("10.0.0.0/8", "127.0.0.1", "::1", "hooks.example.com", "svc_a."))
    assert len(config.webhook_secret) == 2
    weak = "whsec_" + base64.b64encode(b"sixteen bytes!!!").decode()
    for bad in ("whsec_not*base64*at*all*but*quite*long*enough", new_secret()[len("whsec_"):], weak):
        with pytest.raises(ParamError) as caught:
            ServerConfig(webhook_secret=(bad,))
        assert caught.value.param == "webhook_secret" and bad not in str(caught.value)
    for bad in ("10.0.0.0/33", "bad host", "10.0.0", "http://hooks.example.com"):
        with pytest.raises(ParamError, match="webhook_allow: .*got"):
            ServerConfig(webhook_allow=(bad,))
    with pytest.raises(ParamError, match="webhook_retry_seconds"):
        ServerConfig(webhook_retry_seconds=-1)
