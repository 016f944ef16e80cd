"""Webhook delivery latency: from the commit of a change to its receipt by an endpoint.

    .venv-sdk/bin/python bench/webhook_latency.py [--rate 100] [--seconds 10] [--accounts 10] [--poll-ms 50] [--release]

Starts `keyward serve` (temp data dir, SQLite, webhooks on) and a receiver on loopback that
verifies every delivery with the Standard Webhooks reference library, then switches key
sources at `--rate` changes per second spread over `--accounts` accounts (each switch is one
`key.source_changed` event). Latency is the receipt time minus the event's own timestamp
(the moment the change was made, milliseconds, same clock). Prints p50/p90/p99/max and how
many events were committed and received. Uses the debug build unless --release (build it
first: `cargo build --release -p keyward`).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "python"))

from conftest import random_key  # noqa: E402
from test_webhooks import SECRET, Node, Receiver, free_port, list_events  # noqa: E402


class NoFakes:
    base_url = "http://127.0.0.1:9"  # no provider is called: only keys and sources change


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--accounts", type=int, default=10)
    ap.add_argument("--release", action="store_true")
    ap.add_argument("--poll-ms", type=int, default=50, help="KEYWARD_WEBHOOK_POLL_MS (default: keyward's own, 50)")
    args = ap.parse_args()
    if args.release:
        import os

        os.environ["KEYWARD_BIN"] = str(REPO / "target" / "release" / "keyward")

    data_dir = tempfile.mkdtemp(prefix="keyward-webhook-bench-")
    receiver = Receiver(free_port(), SECRET).start()
    node = Node(NoFakes(), receiver.url, SECRET, data_dir, {"KEYWARD_WEBHOOK_POLL_MS": str(args.poll_ms)})  # type: ignore[arg-type]
    try:
        kw = node.start()
        accounts = [kw.owner_account] + [kw.create_account(f"Bench {i}") for i in range(args.accounts - 1)]
        for a in accounts:
            r = kw.api("PUT", f"/v1/accounts/{a}/model-keys/openai", {"api_key": random_key("openai", "bench")})
            assert r.status == 200, r
        receiver.wait_for(lambda ev: len(ev) >= len(accounts) or None, "the key.saved events")
        warmup = len(receiver.events())

        total = int(args.rate * args.seconds)
        interval = 1.0 / args.rate
        source = {a: "shared" for a in accounts}
        lock = threading.Lock()
        errors = 0

        def switch(account: str) -> None:
            nonlocal errors
            with lock:
                source[account] = "own" if source[account] == "shared" else "shared"
                want = source[account]
            r = kw.api("PUT", f"/v1/accounts/{account}/model-keys/openai/source", {"source": want})
            if r.status != 200:
                with lock:
                    errors += 1

        # One thread per account keeps each account's switches in order; the schedule is open
        # (each switch starts on time whatever the previous one took).
        start = time.monotonic()
        threads = []
        for i in range(total):
            due = start + i * interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t = threading.Thread(target=switch, args=(accounts[i % len(accounts)],))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        sent_for = time.monotonic() - start
        committed = [e for e in list_events(kw) if e["type"] == "key.source_changed"]
        receiver.wait_for(lambda ev: len(ev) >= warmup + len(committed) or None, "every switch", timeout=120)

        latencies = []
        with receiver._lock:
            first_receipt: dict[str, float] = {}
            for d in receiver.deliveries:
                first_receipt.setdefault(d.headers["webhook-id"], d.received_at)
            events = {d.headers["webhook-id"]: d.event for d in receiver.deliveries}
        for i, e in events.items():
            if e["type"] != "key.source_changed":
                continue
            at = datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
            latencies.append((first_receipt[i] - at) * 1000)
        print(f"webhook latency, commit to receipt (poll {args.poll_ms} ms): {len(committed)} events committed at {total / sent_for:.0f}/s "
              f"over {sent_for:.1f} s ({len(accounts)} accounts, {errors} failed switches), "
              f"{len(latencies)} received, {len(receiver.ids()) - len(events)} duplicate deliveries")
        print(f"p50 {percentile(latencies, 50):.1f} ms, p90 {percentile(latencies, 90):.1f} ms, "
              f"p99 {percentile(latencies, 99):.1f} ms, max {max(latencies):.1f} ms, "
              f"mean {statistics.mean(latencies):.1f} ms")
        return 0 if len(latencies) == len(committed) and errors == 0 else 1
    finally:
        node.stop()
        receiver.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
