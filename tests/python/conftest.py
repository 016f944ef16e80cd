"""Session fixtures for the SDK suite: the REAL `keyward` and `keyward-fakes` binaries.

Nothing is built here (`tests/python/run.sh` builds). The binaries are found at
`$KEYWARD_BIN` / `$KEYWARD_FAKES_BIN`, else under `$CARGO_TARGET_DIR/debug` or the
workspace's `target/debug`.

One `keyward-fakes` (fake Anthropic, OpenAI and Google on one loopback port) and one
`keyward serve` (temp data dir, port 0, every provider base URL pointed at the fake) run for
the whole session and are stopped at its end (SIGTERM, SIGKILL after a grace period).
The fake is steered and read over its HTTP control API (`/_fake/keys`, `/_fake/requests`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PROVIDERS = ("anthropic", "openai", "google")
OWNER_EMAIL = "owner@localhost"

FAKES_LISTENING = "keyward-fakes: listening on "
KW_LISTENING = "keyward: listening on "
KW_TOKEN = "keyward: owner token (shown once): "
KW_ACCOUNT = "keyward: owner account: "

READY_TIMEOUT = 30.0
STOP_GRACE = 10.0

# The SDKs read their own environment variables (keys, base URLs, org ids, Vertex
# switches, API versions): none of the test runner's may steer them. Loopback never goes
# through a proxy.
for _name in list(os.environ):
    if _name.startswith(("OPENAI_", "ANTHROPIC_", "GOOGLE_", "GEMINI_", "CLAUDE_")):
        del os.environ[_name]
for _name in ("NO_PROXY", "no_proxy"):
    os.environ[_name] = ",".join(filter(None, [os.environ.get(_name, ""), "127.0.0.1", "localhost"]))


def _binary(env_var: str, name: str) -> Path:
    if os.environ.get(env_var):
        path = Path(os.environ[env_var])
    else:
        target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
        if not target.is_absolute():
            target = REPO / target
        path = target / "debug" / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        # A missing binary is a broken setup, never a skip.
        pytest.fail(
            f"{name} binary not found at {path}: run `cargo build -p keyward -p keyward-fakes` "
            f"(tests/python/run.sh does) or set ${env_var}",
            pytrace=False,
        )
    return path


def random_key(provider: str, tag: str) -> str:
    """A key in the provider's real format (keyward checks formats before saving)."""
    if provider == "anthropic":
        return f"sk-ant-api03-kw{tag}-" + secrets.token_hex(16)
    if provider == "openai":
        return f"sk-proj-kw{tag}" + secrets.token_hex(16)
    if provider == "google":
        # An auth key, the kind Google AI Studio issues today: AQ. and what follows
        # (standard AIza keys are refused by Google, and by the fake).
        return f"AQ.Ab8RN6kw{tag}" + secrets.token_hex(20)
    raise ValueError(provider)


# --------------------------------------------------------------------------- processes


class Proc:
    """A child process whose stdout and stderr are captured line by line."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]):
        self.name = name
        self.argv = argv
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.popen = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Its own process group: keyward's worker processes can be ended with it
            # if it does not stop on SIGTERM.
            start_new_session=True,
        )
        self._readers = [
            threading.Thread(target=self._pump, args=(self.popen.stdout, "out"), daemon=True),
            threading.Thread(target=self._pump, args=(self.popen.stderr, "err"), daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _pump(self, pipe, tag: str) -> None:
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._lock:
                self.lines.append(f"{tag}| {line}")
        pipe.close()

    def stdout_value(self, prefix: str) -> str | None:
        with self._lock:
            for line in self.lines:
                if line.startswith("out| " + prefix):
                    value = line[len("out| " + prefix):].strip()
                    if value:
                        return value
        return None

    def output(self, last: int = 200) -> str:
        with self._lock:
            return "\n".join(self.lines[-last:])

    def wait_for(self, prefixes: list[str], timeout: float = READY_TIMEOUT) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            values = [self.stdout_value(p) for p in prefixes]
            if all(values):
                return values  # type: ignore[return-value]
            if self.popen.poll() is not None:
                time.sleep(0.2)
                raise RuntimeError(
                    f"{self.name} exited ({self.popen.returncode}) before printing {prefixes}\n{self.output()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not print {prefixes} within {timeout}s\n{self.output()}")
            time.sleep(0.02)

    def stop(self) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(5)
        for t in self._readers:
            t.join(2)
        return self.popen.returncode


# --------------------------------------------------------------------------- HTTP


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def http(method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 30) -> Resp:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with _OPENER.open(req, timeout=timeout) as r:
            return Resp(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode("utf-8", "replace"))
    except urllib.error.HTTPError as e:
        return Resp(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode("utf-8", "replace"))


class Fakes:
    """The fake providers, over their HTTP control API."""

    def __init__(self, proc: Proc, base_url: str):
        self.proc = proc
        self.base_url = base_url

    def set_key(self, key: str, behaviour: str, provider: str | None = None, delay_ms: int | None = None) -> None:
        body: dict[str, Any] = {"key": key, "behaviour": behaviour}
        if provider:
            body["provider"] = provider
        if delay_ms is not None:
            body["delay_ms"] = delay_ms
        r = http("POST", f"{self.base_url}/_fake/keys", body)
        assert r.status == 200, f"POST /_fake/keys {body}: {r}"

    def requests(self) -> list[dict[str, Any]]:
        r = http("GET", f"{self.base_url}/_fake/requests")
        assert r.status == 200, f"GET /_fake/requests: {r}"
        return r.json()["requests"]

    def clear(self) -> None:
        r = http("DELETE", f"{self.base_url}/_fake/requests")
        assert r.status in (200, 204), f"DELETE /_fake/requests: {r}"


@dataclass
class Keyward:
    proc: Proc
    bin: Path
    env: dict[str, str]
    base_url: str
    token: str
    owner_account: str
    fakes: Fakes
    # provider -> key, set in the shared pool through the CLI
    shared_keys: dict[str, str] = field(default_factory=dict)

    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> Resp:
        return http(method, self.base_url + path, body, token or self.token)

    def cli(self, *args: str, stdin: str | None = None) -> dict[str, Any] | None:
        """Runs `keyward <args>` on the server's data dir; returns its JSON output."""
        p = subprocess.run(
            [str(self.bin), *args],
            env=self.env,
            input=(stdin or "").encode(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        out, err = p.stdout.decode(), p.stderr.decode()
        assert p.returncode == 0, f"keyward {' '.join(args)} exited {p.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"
        out = out.strip()
        return json.loads(out) if out else None

    def provider_base(self, account: str, provider: str) -> str:
        return f"{self.base_url}/v1/accounts/{account}/providers/{provider}"

    # ---- accounts and keys

    def create_account(self, name: str) -> str:
        out = self.cli("admin", "create-account", "--name", name, "--plan", "pro", "--owner", OWNER_EMAIL)
        assert out and out.get("account_id"), f"create-account printed {out}"
        return out["account_id"]

    def set_limit(self, account: str, limit: int) -> None:
        out = self.cli(
            "admin", "set-plan", "--account", account, "--plan", "pro", "--shared-credit-limit", str(limit)
        )
        assert out is None or out.get("shared_credit_limit") in (None, limit), f"set-plan printed {out}"

    def save_own_key(self, account: str, provider: str, key: str) -> None:
        r = self.api("PUT", f"/v1/accounts/{account}/model-keys/{provider}", {"api_key": key})
        assert r.status == 200, f"save {provider} key: {r}"
        r = self.api("PUT", f"/v1/accounts/{account}/model-keys/{provider}/source", {"source": "own"})
        assert r.status == 200 and r.json()["source"] == "own", f"source own for {provider}: {r}"

    def models(self, account: str, provider: str) -> list[str]:
        r = self.api("GET", f"/v1/accounts/{account}/model-keys")
        assert r.status == 200, f"GET model-keys: {r}"
        for p in r.json()["providers"]:
            if p["provider"] == provider:
                return list(p["models"])
        raise AssertionError(f"no {provider} in {r.text}")

    def usage(self, account: str) -> dict[str, Any]:
        r = self.api("GET", f"/v1/accounts/{account}/usage")
        assert r.status == 200, f"GET usage: {r}"
        return r.json()


@dataclass
class Accounts:
    """Accounts the suite works with, each with its keys."""

    own: str  # own keys the fake answers "ok" for
    own_keys: dict[str, str]
    bad: str  # own keys the fake does not know (its invalid-key error)
    bad_keys: dict[str, str]
    echo: str  # own keys the fake echoes in full in its invalid-key error
    echo_keys: dict[str, str]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def fakes():
    fakes_bin = _binary("KEYWARD_FAKES_BIN", "keyward-fakes")
    proc = Proc("keyward-fakes", [str(fakes_bin), "--listen", "127.0.0.1:0"], dict(os.environ))
    try:
        (url,) = proc.wait_for([FAKES_LISTENING])
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    yield Fakes(proc, url.rstrip("/"))
    proc.stop()


@pytest.fixture(scope="session")
def keyward(fakes: Fakes):
    bin_path = _binary("KEYWARD_BIN", "keyward")
    data_dir = tempfile.mkdtemp(prefix="keyward-sdk-")
    # Nothing from the runner's environment may steer the server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
    env.update(
        KEYWARD_DATA_DIR=data_dir,
        KEYWARD_LISTEN="127.0.0.1:0",
        # One OS user for gateway and workers, as on a developer's machine (README, Deployment).
        KEYWARD_ALLOW_SAME_USER="1",
        KEYWARD_LOG=os.environ.get("KEYWARD_SDK_LOG", "info"),
        KEYWARD_ANTHROPIC_BASE_URL=fakes.base_url,
        KEYWARD_OPENAI_BASE_URL=fakes.base_url,
        KEYWARD_GOOGLE_BASE_URL=fakes.base_url,
        NO_COLOR="1",
        RUST_BACKTRACE="1",
    )
    proc = Proc("keyward serve", [str(bin_path), "serve"], env)
    try:
        url, token, account = proc.wait_for([KW_LISTENING, KW_TOKEN, KW_ACCOUNT])
    except RuntimeError as e:
        shutil.rmtree(data_dir, ignore_errors=True)
        pytest.fail(str(e), pytrace=False)
    kw = Keyward(proc, bin_path, env, url.rstrip("/"), token, account, fakes)
    # The platform's shared-pool keys, through the CLI (key on stdin), answered "ok" by the fake.
    for p in PROVIDERS:
        key = random_key(p, "shared")
        fakes.set_key(key, "ok", p)
        kw.cli("admin", "set-shared-key", "--provider", p, stdin=key + "\n")
        kw.shared_keys[p] = key
    yield kw
    code = proc.stop()
    shutil.rmtree(data_dir, ignore_errors=True)
    # A server that crashed mid-session is a defect even if every test passed.
    assert code in (0, -signal.SIGTERM), f"keyward serve exited {code} on SIGTERM\n{proc.output()}"


@pytest.fixture(scope="session")
def accounts(keyward: Keyward) -> Accounts:
    fakes = keyward.fakes
    own_keys = {p: random_key(p, "own") for p in PROVIDERS}
    bad_keys = {p: random_key(p, "bad") for p in PROVIDERS}
    echo_keys = {p: random_key(p, "echo") for p in PROVIDERS}
    bad = keyward.create_account("SDK bad keys")
    echo = keyward.create_account("SDK echoed keys")
    for p in PROVIDERS:
        fakes.set_key(own_keys[p], "ok", p)
        fakes.set_key(echo_keys[p], "echo_key", p)
        keyward.save_own_key(keyward.owner_account, p, own_keys[p])
        keyward.save_own_key(bad, p, bad_keys[p])
        keyward.save_own_key(echo, p, echo_keys[p])
    return Accounts(keyward.owner_account, own_keys, bad, bad_keys, echo, echo_keys)


@pytest.fixture
def fake(keyward: Keyward) -> Fakes:
    """The fake, with its record of requests emptied for this test."""
    keyward.fakes.clear()
    return keyward.fakes
