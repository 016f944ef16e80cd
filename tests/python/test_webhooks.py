"""Signed webhooks, through the real binary, to a real receiver on loopback that verifies
every delivery with the Standard Webhooks reference library (PyPI `standardwebhooks`).

Each test starts its own `keyward serve` (temp data dir, webhooks on, short retry delays) so
it can stop, kill and restart it; the fake providers are the session's.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from conftest import (
    KW_ACCOUNT,
    KW_LISTENING,
    KW_TOKEN,
    Fakes,
    Keyward,
    Proc,
    _binary,
    random_key,
)

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
WAIT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Delivery:
    body: bytes
    headers: dict[str, str]
    received_at: float  # time.time()
    event: dict


@dataclass
class Receiver:
    """An endpoint that verifies each request with the reference library and answers 204;
    a request that does not verify is recorded as rejected and answered 400."""

    port: int
    secret: str
    deliveries: list[Delivery] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/keyward"

    def start(self) -> "Receiver":
        receiver = self
        verifier = Webhook(self.secret)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    event = verifier.verify(body, headers)
                except WebhookVerificationError as e:
                    with receiver._lock:
                        receiver.rejected.append(str(e))
                    self.send_response(400)
                    self.end_headers()
                    return
                with receiver._lock:
                    receiver.deliveries.append(Delivery(body, headers, time.time(), event))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def ids(self) -> list[str]:
        with self._lock:
            return [d.headers["webhook-id"] for d in self.deliveries]

    def events(self) -> list[tuple[str, dict]]:
        """(webhook-id, event) per distinct id, in the order first received."""
        seen, out = set(), []
        with self._lock:
            for d in self.deliveries:
                i = d.headers["webhook-id"]
                if i not in seen:
                    seen.add(i)
                    out.append((i, d.event))
        return out

    def wait_for(self, pred, what: str, timeout: float = WAIT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = pred(self.events())
            if got:
                return got
            time.sleep(0.05)
        raise AssertionError(f"receiver never saw {what}; got {[e['type'] for _, e in self.events()]}")


class Stalling:
    """Takes the receiver's port, accepts each connection, reads and never answers: a
    delivery that reaches it stays in flight (its event claimed) until keyward's timeout."""

    def __init__(self, port: int):
        self._sock = socket.create_server(("127.0.0.1", port))
        self.requests = 0
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            try:
                if conn.recv(65536):
                    self.requests += 1
            except OSError:
                pass

    def stop(self) -> None:
        # shutdown wakes the accept() blocked in the thread; close alone leaves the port bound.
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        for c in self._conns:
            c.close()


class Node:
    """One `keyward serve` with webhooks on, on a data dir that outlives restarts."""

    def __init__(self, fakes: Fakes, receiver_url: str, secret: str, data_dir: str, extra: dict[str, str] | None = None):
        self.fakes = fakes
        self.data_dir = data_dir
        secrets_file = Path(data_dir) / "webhook-secrets"
        if not secrets_file.exists():
            Path(data_dir).mkdir(mode=0o700, exist_ok=True)
            fd = os.open(secrets_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"# the receiver at {receiver_url}\n{secret}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
        env.update(
            KEYWARD_DATA_DIR=data_dir,
            KEYWARD_LISTEN="127.0.0.1:0",
            # One OS user for gateway and workers, as on a developer's machine (README, Deployment).
            KEYWARD_ALLOW_SAME_USER="1",
            KEYWARD_LOG="info",
            KEYWARD_ANTHROPIC_BASE_URL=fakes.base_url,
            KEYWARD_OPENAI_BASE_URL=fakes.base_url,
            KEYWARD_GOOGLE_BASE_URL=fakes.base_url,
            KEYWARD_WEBHOOK_URLS=receiver_url,
            KEYWARD_WEBHOOK_SECRETS_FILE=str(secrets_file),
            KEYWARD_WEBHOOK_RETRY_BASE_MS="200",
            KEYWARD_WEBHOOK_POLL_MS="20",
            KEYWARD_WEBHOOK_TIMEOUT_MS="2000",
            NO_COLOR="1",
        )
        env.update(extra or {})
        self.env = env
        self.bin = _binary("KEYWARD_BIN", "keyward")
        self.kw: Keyward | None = None
        self.token: str | None = None
        self.account: str | None = None

    def start(self) -> Keyward:
        proc = Proc("keyward serve (webhooks)", [str(self.bin), "serve"], self.env)
        if self.token is None:
            url, self.token, self.account = proc.wait_for([KW_LISTENING, KW_TOKEN, KW_ACCOUNT])
        else:
            (url,) = proc.wait_for([KW_LISTENING])
        self.kw = Keyward(proc, self.bin, self.env, url.rstrip("/"), self.token, self.account, self.fakes)
        return self.kw

    def kill9(self) -> None:
        assert self.kw
        os.killpg(self.kw.proc.popen.pid, signal.SIGKILL)
        self.kw.proc.popen.wait(10)

    def stop(self) -> None:
        if self.kw and self.kw.proc.popen.poll() is None:
            self.kw.proc.stop()


@pytest.fixture
def webhook_env(keyward: Keyward):
    """A receiver (not started) and a node factory; everything stopped and removed after."""
    data_dir = tempfile.mkdtemp(prefix="keyward-webhooks-")
    receiver = Receiver(free_port(), SECRET)
    nodes: list[Node] = []

    def node(**extra: str) -> Node:
        n = Node(keyward.fakes, receiver.url, SECRET, data_dir, extra)
        nodes.append(n)
        return n

    yield receiver, node
    for n in nodes:
        n.stop()
    receiver.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


def list_events(kw: Keyward, *args: str) -> list[dict]:
    """`keyward webhooks list` (JSON lines, newest first), oldest first."""
    out = subprocess.run(
        [str(kw.bin), "webhooks", "list", "--limit", "10000", *args],
        env=kw.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        timeout=60,
        check=True,
    ).stdout.decode()
    return list(reversed([json.loads(line) for line in out.splitlines() if line.strip()]))


def test_every_key_change_is_signed_verifiable_and_carries_no_key(webhook_env, keyward: Keyward):
    receiver, node = webhook_env
    receiver.start()
    kw = node().start()
    fakes = keyward.fakes
    account = kw.owner_account
    key = random_key("openai", "hook")
    key2 = random_key("openai", "hook2")
    fakes.set_key(key2, "ok", "openai")
    assert kw.api("PUT", f"/v1/accounts/{account}/model-keys/openai", {"api_key": key}).status == 200
    # Test key on a key the fake does not know: key.test_failed with the diagnosis.
    r = kw.api("POST", f"/v1/accounts/{account}/model-keys/openai/test")
    assert r.status == 200 and r.json()["ok"] is False, r
    assert kw.api("PUT", f"/v1/accounts/{account}/model-keys/openai", {"api_key": key2}).status == 200
    assert kw.api("PUT", f"/v1/accounts/{account}/model-keys/openai/source", {"source": "own"}).status == 200
    assert kw.api("PUT", f"/v1/accounts/{account}/model-keys/openai/source", {"source": "shared"}).status == 200
    assert kw.api("DELETE", f"/v1/accounts/{account}/model-keys/openai").status in (200, 204)
    kw.cli("admin", "set-plan", "--account", account, "--plan", "business")

    want = ["key.saved", "key.test_failed", "key.rotated", "key.source_changed", "key.source_changed", "key.removed",
            "account.plan_changed"]
    events = receiver.wait_for(lambda ev: ev if len(ev) >= len(want) else None, f"{len(want)} events")
    assert [e["type"] for _, e in events] == want, "one event per change, in order"
    assert receiver.rejected == [], receiver.rejected
    for i, e in events:
        assert i.startswith("msg_")
        assert e["data"]["account_id"] == account
        assert datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).tzinfo is not None
    by_type = [e for _, e in events]
    assert by_type[0]["data"]["key_last4"] == key[-4:] and by_type[0]["data"]["provider"] == "openai"
    assert by_type[1]["data"]["diagnosis"] == "invalid_key"
    assert by_type[2]["data"]["key_last4"] == key2[-4:]
    assert [by_type[3]["data"]["key_source"], by_type[4]["data"]["key_source"]] == ["own", "shared"]
    assert by_type[6]["data"]["plan"] == "business" and by_type[6]["data"]["detail"].startswith("pro -> business")
    assert by_type[6]["data"]["actor"] == "cli"
    for d in receiver.deliveries:
        text = d.body.decode()
        for k in (key, key2):
            assert k not in text and k[:-4] not in text, "nothing of a key but last4 in a payload"

    # The reference library rejects a tampered body, and a timestamp outside its tolerance.
    verifier = Webhook(SECRET)
    d = receiver.deliveries[0]
    verifier.verify(d.body, d.headers)  # as received: fine
    with pytest.raises(WebhookVerificationError):
        verifier.verify(d.body.replace(account.encode(), b"acc_" + b"0" * 32), d.headers)
    stale = dict(d.headers, **{"webhook-timestamp": str(int(time.time()) - 600)})
    with pytest.raises(WebhookVerificationError):
        verifier.verify(d.body, stale)
    # Even correctly signed, a stale timestamp is refused: the signature covers it.
    old = datetime.now(timezone.utc) - timedelta(minutes=10)
    resigned = dict(d.headers, **{"webhook-timestamp": str(int(old.timestamp())),
                                  "webhook-signature": verifier.sign(d.headers["webhook-id"], old, d.body)})
    with pytest.raises(WebhookVerificationError):
        verifier.verify(d.body, resigned)

    # The CLI lists them as delivered; /metrics counts the deliveries.
    listed = list_events(kw)
    assert [e["type"] for e in listed] == want and all(e["status"] == "delivered" for e in listed), listed
    metrics = kw.api("GET", "/metrics").text
    delivered = [l for l in metrics.splitlines() if l.startswith('keyward_webhook_deliveries_total{outcome="delivered"}')]
    assert delivered and float(delivered[0].split()[-1]) >= len(want), delivered
    assert "keyward_webhook_oldest_pending_age_seconds" in metrics


def test_a_receiver_that_was_down_gets_every_event_once_by_id(webhook_env, keyward: Keyward):
    receiver, node = webhook_env
    n = node()
    kw = n.start()
    second = kw.create_account("Webhooks second")
    changes = 0
    for account in (kw.owner_account, second):
        for p in ("anthropic", "openai", "google"):
            assert kw.api("PUT", f"/v1/accounts/{account}/model-keys/{p}", {"api_key": random_key(p, "down")}).status == 200
            assert kw.api("PUT", f"/v1/accounts/{account}/model-keys/{p}/source", {"source": "own"}).status == 200
            changes += 2
    # Down for a while: several attempts fail, the CLI and /metrics show it.
    deadline = time.monotonic() + WAIT
    while True:
        failed = list_events(kw, "--failed")
        if failed and all(e["attempts"] >= 2 for e in failed):
            break
        assert time.monotonic() < deadline, failed
        time.sleep(0.1)
    assert {e["last_error"] for e in failed} == {"endpoint 1: cannot connect"}, failed
    def oldest_age() -> float:
        lines = kw.api("GET", "/metrics").text.splitlines()
        age = [l for l in lines if l.startswith("keyward_webhook_oldest_pending_age_seconds ")]
        return float(age[0].split()[-1]) if age else 0.0

    while oldest_age() <= 0:  # the gauge is refreshed every second
        assert time.monotonic() < deadline, "the oldest pending event's age never showed"
        time.sleep(0.2)

    receiver.start()
    committed = list_events(kw)
    assert len(committed) == changes
    want = {e["event_id"] for e in committed}
    receiver.wait_for(lambda ev: {i for i, _ in ev} >= want or None, f"all {changes} events")
    got = receiver.events()
    assert {i for i, _ in got} == want, "every committed event, and nothing else"
    assert receiver.rejected == []
    # In order per account.
    for account in (kw.owner_account, second):
        mine = [i for i, e in got if e["data"]["account_id"] == account]
        assert mine == [e["event_id"] for e in committed if e["account_id"] == account]
    print(f"\nreceiver down: {changes} events committed, {len(want)} delivered "
          f"({len(receiver.ids())} deliveries, {len(receiver.ids()) - len(want)} duplicates)")


def test_kill_9_between_commit_and_delivery_loses_no_event(webhook_env, keyward: Keyward):
    receiver, node = webhook_env
    n = node()
    kw = n.start()
    for p in ("anthropic", "openai", "google"):
        assert kw.api("PUT", f"/v1/accounts/{kw.owner_account}/model-keys/{p}", {"api_key": random_key(p, "kill")}).status == 200
    # Committed (the API answered), not delivered (the receiver is down): kill -9 now.
    n.kill9()
    committed = list_events(kw)  # the CLI, on the dead node's data dir
    assert [e["status"] for e in committed] == ["pending"] * 3, committed
    receiver.start()
    kw = n.start()
    want = {e["event_id"] for e in committed}
    receiver.wait_for(lambda ev: {i for i, _ in ev} >= want or None, "the events committed before kill -9")
    assert {i for i, _ in receiver.events()} == want
    print(f"\nkill -9: 3 events committed, {len(want)} delivered after restart")


def test_kill_9_mid_delivery_frees_the_claim_at_restart(webhook_env, keyward: Keyward):
    """The dead run's claim on an event would hold it for timeout + 30 s (50 s here); the
    restarted node frees its own earlier runs' claims at once."""
    receiver, node = webhook_env
    n = node(KEYWARD_WEBHOOK_TIMEOUT_MS="20000")
    stalling = Stalling(receiver.port)
    try:
        kw = n.start()
        assert kw.api("PUT", f"/v1/accounts/{kw.owner_account}/model-keys/openai", {"api_key": random_key("openai", "stall")}).status == 200
        deadline = time.monotonic() + WAIT
        while stalling.requests == 0:
            assert time.monotonic() < deadline, "the delivery never reached the receiver's port"
            time.sleep(0.02)
        # Claimed and in flight: kill -9 now.
        n.kill9()
    finally:
        stalling.stop()
    committed = list_events(kw)
    assert [(e["status"], e["attempts"]) for e in committed] == [("pending", 0)], committed
    receiver.start()
    restarted = time.monotonic()
    kw = n.start()
    want = {e["event_id"] for e in committed}
    receiver.wait_for(lambda ev: {i for i, _ in ev} >= want or None, "the event claimed by the dead run", timeout=15.0)
    took = time.monotonic() - restarted
    assert {i for i, _ in receiver.events()} == want
    print(f"\nkill -9 mid-delivery: delivered {took * 1000:.0f} ms after the restart (the dead claim's lease: 50 s)")


def test_a_key_failing_n_times_in_a_row_sends_one_key_failing(webhook_env, keyward: Keyward):
    receiver, node = webhook_env
    receiver.start()
    kw = node(KEYWARD_KEY_FAILING_AFTER="3").start()
    account = kw.owner_account
    key = random_key("anthropic", "failing")  # unknown to the fake: its invalid-key error
    kw.save_own_key(account, "anthropic", key)
    body = {"provider": "anthropic", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    for _ in range(6):
        r = kw.api("POST", f"/v1/accounts/{account}/ai/messages", body)
        assert r.status >= 400, r
    receiver.wait_for(lambda ev: [e for _, e in ev if e["type"] == "key.failing"] or None, "key.failing")
    # The key works again (the provider now accepts it): key.recovered, once.
    keyward.fakes.set_key(key, "ok", "anthropic")
    for _ in range(2):
        assert kw.api("POST", f"/v1/accounts/{account}/ai/messages", body).status == 200
    receiver.wait_for(lambda ev: [e for _, e in ev if e["type"] == "key.recovered"] or None, "key.recovered")
    time.sleep(0.5)  # anything late would show now
    types = [e["type"] for _, e in receiver.events()]
    assert types.count("key.failing") == 1 and types.count("key.recovered") == 1, types
    failing = next(e for _, e in receiver.events() if e["type"] == "key.failing")
    assert failing["data"] == {**failing["data"], "provider": "anthropic", "key_last4": key[-4:], "diagnosis": "invalid_key"}


def test_webhooks_refuse_a_secrets_file_others_can_read(webhook_env, keyward: Keyward):
    receiver, node = webhook_env
    n = node()
    os.chmod(Path(n.data_dir) / "webhook-secrets", 0o644)
    proc = Proc("keyward serve (bad secrets)", [str(n.bin), "serve"], n.env)
    code = proc.popen.wait(30)
    proc.stop()
    assert code != 0
    out = proc.output()
    assert "chmod 600" in out and SECRET not in out and SECRET[6:] not in out, out
