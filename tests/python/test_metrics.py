"""`/metrics` as Prometheus reads it: parsed with the official client's text parser, every
histogram well formed (cumulative buckets ending in +Inf equal to _count, a _sum), and the
process metrics an operator expects."""

from __future__ import annotations

import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

from conftest import Keyward


def scrape(kw: Keyward) -> str:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(kw.base_url + "/metrics") as r:
        assert r.headers["content-type"].startswith("text/plain"), r.headers
        return r.read().decode()


def test_metrics_parse_and_histograms_are_well_formed(keyward: Keyward, accounts):
    # Some traffic first: API calls and one AI call.
    assert keyward.api("GET", "/v1/me").status == 200
    r = keyward.api(
        "POST",
        f"/v1/accounts/{accounts.own}/ai/messages",
        {"provider": "openai", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
    )
    assert r.status == 200, r
    families = {f.name: f for f in text_string_to_metric_families(scrape(keyward))}

    histograms = [f for f in families.values() if f.type == "histogram"]
    names = {f.name for f in histograms}
    assert {"keyward_http_request_duration_seconds", "keyward_ai_call_duration_seconds"} <= names, names
    for family in histograms:
        series: dict[tuple, dict] = defaultdict(lambda: {"buckets": [], "sum": None, "count": None})
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            if s.name.endswith("_bucket"):
                series[labels]["buckets"].append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_sum"):
                series[labels]["sum"] = s.value
            elif s.name.endswith("_count"):
                series[labels]["count"] = s.value
        assert series, f"{family.name} has no series"
        for labels, s in series.items():
            buckets = sorted(s["buckets"])
            assert buckets and buckets[-1][0] == float("inf"), (family.name, labels, buckets)
            counts = [c for _, c in buckets]
            assert counts == sorted(counts), f"{family.name} {labels}: buckets are not cumulative: {buckets}"
            assert s["count"] == buckets[-1][1], f"{family.name} {labels}: +Inf bucket != _count"
            assert s["sum"] is not None and s["sum"] >= 0, f"{family.name} {labels}: no _sum"
    me = [
        s
        for s in families["keyward_http_request_duration_seconds"].samples
        if s.name.endswith("_count") and s.labels.get("route") == "/v1/me"
    ]
    assert me and me[0].value >= 1, me

    for name, kind in [
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ]:
        assert name in families and families[name].type == kind, (name, families.get(name))
        assert families[name].samples[0].value > 0, name
    assert families["keyward_ai_calls"].type == "counter"
