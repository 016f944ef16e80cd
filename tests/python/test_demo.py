"""`keyward demo` as a newcomer uses it: start it, copy what it prints, run it.

The demo is started as its own process (not the session's keyward): its snippets for curl and
for each official SDK are taken from its output and run unchanged, and each must reach the
built-in fake provider. A server standing in for a real provider (the base URLs in the
environment point at it) must see nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import Proc, _binary, http

END = "--- end ---"


class Recorder(BaseHTTPRequestHandler):
    """A stand-in for a real provider: records whatever reaches it."""

    seen: list[str] = []

    def _any(self) -> None:
        Recorder.seen.append(f"{self.command} {self.path}")
        self.send_response(500)
        self.end_headers()

    do_GET = do_POST = do_PUT = _any

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def real_provider():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def demo(real_provider):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
    # Someone's real configuration: the demo must ignore it.
    env.update(
        KEYWARD_ANTHROPIC_BASE_URL=real_provider,
        KEYWARD_OPENAI_BASE_URL=real_provider,
        KEYWARD_GOOGLE_BASE_URL=real_provider,
        KEYWARD_LOG="warn",
        NO_COLOR="1",
    )
    proc = Proc("keyward demo", [str(_binary("KEYWARD_BIN", "keyward")), "demo"], env)
    deadline = time.monotonic() + 60
    while END not in proc.output(10_000):
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            proc.stop()
            pytest.fail(f"keyward demo did not print its guide:\n{proc.output()}", pytrace=False)
        time.sleep(0.05)
    yield proc
    proc.stop()


def printed(proc: Proc) -> str:
    return "\n".join(line[len("out| "):] for line in proc.output(10_000).splitlines() if line.startswith("out| "))


def block(text: str, name: str) -> str:
    m = re.search(rf"^--- {re.escape(name)} ---\n(.*?)(?=^--- )", text, re.S | re.M)
    assert m, f"no {name!r} block in:\n{text}"
    return m.group(1)


@pytest.mark.parametrize(
    "name, expected",
    [("python: openai", "openai"), ("python: anthropic", "anthropic"), ("python: google-genai", "google")],
)
def test_each_sdk_snippet_runs_as_printed(demo: Proc, real_provider, name: str, expected: str):
    code = block(printed(demo), name)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, name, "exec"), {})  # noqa: S102 - the demo's own snippet, as a newcomer runs it
    assert out.getvalue().strip() == f"Hello from fake {expected}.", out.getvalue()
    assert Recorder.seen == [], f"a real provider was called: {Recorder.seen}"


def test_the_shell_snippet_runs_as_printed(demo: Proc):
    script = block(printed(demo), "shell")
    # Each line as printed; the first curl is an AI call on the shared pool.
    lines = [ln for ln in script.splitlines() if ln and not ln.startswith("#")]
    exports, curls = lines[0], lines[1:]
    results = []
    for curl in curls:
        p = subprocess.run(["bash", "-c", f"{exports}\n{curl}"], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        results.append(p.stdout)
    assert '"content":"Hello from fake openai."' in results[0], results[0]
    assert '"last4":"0001"' in results[1], results[1]
    assert '"ok":true' in results[2] and '"rate_limits"' in results[2], results[2]
    assert '"source":"own"' in results[3], results[3]


def test_every_page_says_it_is_a_demo_and_marker_words_steer_the_fake(demo: Proc):
    text = printed(demo)
    url = re.search(r"export KEYWARD_URL=(\S+) KEYWARD_TOKEN=(\S+) KEYWARD_ACCOUNT=(\S+)", text)
    assert url, text
    base, token, account = url.groups()
    notice = "No real Anthropic, OpenAI or Google service is ever called"
    for path in ("/login", "/login?signed_out=1", "/settings/ai/model-keys"):
        r = http("GET", base + path)
        assert notice in r.text, (path, r.text[:500])
    # JSON answers carry it as a header, errors included.
    for path in ("/v1/me", "/no-such-route"):
        r = http("GET", base + path, None, token)
        assert notice in r.headers.get("keyward-demo", ""), (path, r.headers)
    # A key with a marker word gets the provider's answer for it, in Test key.
    r = http("PUT", f"{base}/v1/accounts/{account}/model-keys/google", {"api_key": "AQ.my-leaked-demo-key-01"}, token)
    assert r.status == 200, r
    r = http("POST", f"{base}/v1/accounts/{account}/model-keys/google/test", None, token)
    assert r.json()["status"] == "key_reported_leaked", r.text


def test_stopping_removes_the_temporary_data(real_provider):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
    proc = Proc("keyward demo", [str(_binary("KEYWARD_BIN", "keyward")), "demo"], env)
    deadline = time.monotonic() + 60
    while END not in proc.output(10_000):
        assert proc.popen.poll() is None and time.monotonic() < deadline, proc.output()
        time.sleep(0.05)
    m = re.search(r"data in (\S+) \(removed", printed(proc))
    assert m, printed(proc)
    data = Path(m.group(1))
    assert data.is_dir()
    proc.popen.send_signal(signal.SIGINT)
    proc.popen.wait(20)
    assert not data.exists(), f"{data} is left behind"
