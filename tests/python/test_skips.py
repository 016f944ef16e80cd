"""Skips are counted, not hidden: a run of the storage conformance suite without PostgreSQL
reports "ok" for its PostgreSQL tests (the harness has no skip), and the summary
`scripts/test` prints says how many did not run, and why."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def conformance_binary() -> str:
    # Already built by `cargo test --workspace` (run.sh builds before pytest): no compile here.
    out = subprocess.run(
        ["cargo", "test", "-p", "keyward-store", "--test", "conformance", "--no-run", "--message-format=json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "conformance":
            if msg.get("executable"):
                return msg["executable"]
    raise AssertionError("no conformance test binary")


def test_a_run_without_postgresql_prints_its_skip_count():
    with tempfile.NamedTemporaryFile(prefix="keyward-skips-", delete=False) as f:
        log = f.name
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_TEST_")}
        env["KEYWARD_TEST_SKIP_LOG"] = log
        run = subprocess.run(
            [conformance_binary(), "postgres::"], env=env, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stdout + run.stderr
        # The harness calls them passed...
        passed = [l for l in run.stdout.splitlines() if l.startswith("test postgres::") and l.endswith(" ok")]
        assert len(passed) >= 10, run.stdout
        # ...the summary does not.
        summary = subprocess.run(
            [str(REPO / "scripts" / "skip-summary"), log], capture_output=True, text=True, check=True
        ).stdout
        assert f"skipped: {len(passed)} test(s) did not run" in summary, summary
        assert f"  {len(passed)}  PostgreSQL: KEYWARD_TEST_POSTGRES_URL is not set" in summary, summary
    finally:
        os.unlink(log)
