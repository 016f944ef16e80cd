//! Prometheus metrics, rendered by hand in the text exposition format (version 0.0.4): a few
//! counters and histograms do not need a metrics framework. Labels are route templates,
//! status codes, providers, key sources, outcomes and catalogued model ids only: never a path
//! with ids, never a key.
//!
//! Histograms have cumulative `_bucket{le}` series ending in `+Inf`, then `_sum` and `_count`;
//! the `process_*` gauges follow the names of Prometheus' own client libraries.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Metrics {
    http: Mutex<BTreeMap<(String, String, u16), Histogram>>,
    key_actions: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    worker_restarts: std::sync::atomic::AtomicU64,
    ai_calls: Mutex<BTreeMap<(&'static str, &'static str, String), u64>>,
    probes: Mutex<BTreeMap<(&'static str, String), u64>>,
    ai_latency: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
    /// Catalogued models a provider said do not exist: count, and when last logged.
    model_not_found: Mutex<BTreeMap<(&'static str, String), GoneModel>>,
    /// Webhook delivery attempts by outcome (`delivered`, `retry`, `dead`).
    webhook_deliveries: Mutex<BTreeMap<&'static str, u64>>,
    /// The outbox's pending events and the oldest one's age in seconds (refreshed every
    /// second by the delivery task; `None` until it first looked, or when webhooks are off).
    webhook_backlog: Mutex<Option<(i64, f64)>>,
}

/// How often a provider said one catalogued model does not exist, and when it was last logged.
type GoneModel = (u64, Option<std::time::Instant>);

/// How often a model the provider no longer has is logged (every time is counted).
const MODEL_NOT_FOUND_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Upper bounds of the AI-call latency buckets, in seconds.
const AI_BUCKETS: [f64; 12] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Upper bounds of the HTTP request latency buckets, in seconds (answers stream: a streamed
/// AI call counts until its head is sent).
const HTTP_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A histogram with fixed bucket bounds (cumulative counts, one per bound).
#[derive(Debug, Default, Clone)]
struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], value: f64) {
        if self.buckets.len() != bounds.len() {
            self.buckets = vec![0; bounds.len()];
        }
        for (bucket, bound) in self.buckets.iter_mut().zip(bounds) {
            if value <= *bound {
                *bucket += 1;
            }
        }
        self.count += 1;
        self.sum += value;
    }

    /// The `_bucket`, `_sum` and `_count` lines of one series.
    fn render(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        for (n, bound) in self.buckets.iter().zip(bounds) {
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {:.6}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

impl Metrics {
    pub fn record_http(&self, method: &str, route: &str, status: u16, micros: u64) {
        if let Ok(mut m) = self.http.lock() {
            m.entry((method.to_owned(), route.to_owned(), status))
                .or_default()
                .observe(&HTTP_BUCKETS, micros as f64 / 1e6);
        }
    }

    pub fn record_key_action(&self, action: &'static str, provider: &'static str) {
        if let Ok(mut m) = self.key_actions.lock() {
            *m.entry((action, provider)).or_default() += 1;
        }
    }

    /// One AI call by provider, key source and outcome (`ok`, `error:<diagnosis>`, `refused:<code>`).
    pub fn record_ai_call(
        &self,
        provider: keyward_core::Provider,
        source: keyward_core::KeySource,
        outcome: keyward_core::Outcome,
    ) {
        if let Ok(mut m) = self.ai_calls.lock() {
            *m.entry((provider.as_str(), source.as_str(), outcome.to_string()))
                .or_default() += 1;
        }
    }

    /// How long an AI call took, end to end through keyward.
    pub fn observe_ai_latency(&self, provider: keyward_core::Provider, source: keyward_core::KeySource, seconds: f64) {
        if let Ok(mut m) = self.ai_latency.lock() {
            m.entry((provider.as_str(), source.as_str()))
                .or_default()
                .observe(&AI_BUCKETS, seconds);
        }
    }

    pub fn record_probe(&self, provider: keyward_core::Provider, outcome: keyward_core::Outcome) {
        if let Ok(mut m) = self.probes.lock() {
            *m.entry((provider.as_str(), outcome.to_string())).or_default() += 1;
        }
    }

    /// A provider answered that catalogued `model` does not exist. Returns whether to log it:
    /// the first time, then at most once an hour per model. `model` is a catalogued id (the
    /// caller checked), so the label set is bounded by the catalogue.
    pub fn record_model_not_found(&self, provider: keyward_core::Provider, model: &str) -> bool {
        let Ok(mut m) = self.model_not_found.lock() else {
            return false;
        };
        let (count, logged) = m.entry((provider.as_str(), model.to_owned())).or_default();
        *count += 1;
        let now = std::time::Instant::now();
        let log = logged.is_none_or(|at| now.duration_since(at) >= MODEL_NOT_FOUND_LOG_EVERY);
        if log {
            *logged = Some(now);
        }
        log
    }

    pub fn record_webhook_delivery(&self, outcome: &'static str) {
        if let Ok(mut m) = self.webhook_deliveries.lock() {
            *m.entry(outcome).or_default() += 1;
        }
    }

    pub fn set_webhook_backlog(&self, pending: i64, oldest_age_seconds: f64) {
        if let Ok(mut b) = self.webhook_backlog.lock() {
            *b = Some((pending, oldest_age_seconds));
        }
    }

    pub fn record_worker_restart(&self) {
        self.worker_restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        header(
            &mut out,
            "keyward_worker_restarts_total",
            "counter",
            "Worker processes that exited and were restarted.",
        );
        let _ = writeln!(
            out,
            "keyward_worker_restarts_total {}",
            self.worker_restarts.load(std::sync::atomic::Ordering::Relaxed)
        );
        let http = self.http.lock().map(|m| m.clone()).unwrap_or_default();
        header(
            &mut out,
            "keyward_http_requests_total",
            "counter",
            "HTTP requests by method, route template and status.",
        );
        for ((method, route, status), h) in &http {
            let _ = writeln!(
                out,
                "keyward_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {}",
                h.count
            );
        }
        header(
            &mut out,
            "keyward_http_request_duration_seconds",
            "histogram",
            "Time to answer an HTTP request (to the head of a streamed answer), by method, route template and status.",
        );
        for ((method, route, status), h) in &http {
            let labels = format!("method=\"{method}\",route=\"{route}\",status=\"{status}\"");
            h.render(
                &mut out,
                "keyward_http_request_duration_seconds",
                &labels,
                &HTTP_BUCKETS,
            );
        }
        header(
            &mut out,
            "keyward_ai_calls_total",
            "counter",
            "AI calls by provider, key source and outcome.",
        );
        let calls = self.ai_calls.lock().map(|m| m.clone()).unwrap_or_default();
        for ((provider, source, outcome), n) in &calls {
            let _ = writeln!(
                out,
                "keyward_ai_calls_total{{provider=\"{provider}\",source=\"{source}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        header(
            &mut out,
            "keyward_ai_call_duration_seconds",
            "histogram",
            "AI call latency through keyward.",
        );
        let latency = self.ai_latency.lock().map(|m| m.clone()).unwrap_or_default();
        for ((provider, source), h) in &latency {
            let labels = format!("provider=\"{provider}\",source=\"{source}\"");
            h.render(&mut out, "keyward_ai_call_duration_seconds", &labels, &AI_BUCKETS);
        }
        header(
            &mut out,
            "keyward_model_not_found_total",
            "counter",
            "Calls and key tests on a catalogued model that the provider says does not exist.",
        );
        let gone = self.model_not_found.lock().map(|m| m.clone()).unwrap_or_default();
        for ((provider, model), (n, _)) in &gone {
            let _ = writeln!(
                out,
                "keyward_model_not_found_total{{provider=\"{provider}\",model=\"{model}\"}} {n}"
            );
        }
        header(
            &mut out,
            "keyward_key_tests_total",
            "counter",
            "Key tests by provider and outcome.",
        );
        let probes = self.probes.lock().map(|m| m.clone()).unwrap_or_default();
        for ((provider, outcome), n) in &probes {
            let _ = writeln!(
                out,
                "keyward_key_tests_total{{provider=\"{provider}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        header(
            &mut out,
            "keyward_key_actions_total",
            "counter",
            "Key-management actions by action and provider.",
        );
        let keys = self.key_actions.lock().map(|m| m.clone()).unwrap_or_default();
        for ((action, provider), n) in &keys {
            let _ = writeln!(
                out,
                "keyward_key_actions_total{{action=\"{action}\",provider=\"{provider}\"}} {n}"
            );
        }
        header(
            &mut out,
            "keyward_webhook_deliveries_total",
            "counter",
            "Webhook delivery attempts by outcome (delivered, retry, dead).",
        );
        let deliveries = self.webhook_deliveries.lock().map(|m| m.clone()).unwrap_or_default();
        for (outcome, n) in &deliveries {
            let _ = writeln!(out, "keyward_webhook_deliveries_total{{outcome=\"{outcome}\"}} {n}");
        }
        if let Some((pending, oldest_age)) = self.webhook_backlog.lock().ok().and_then(|b| *b) {
            header(
                &mut out,
                "keyward_webhook_pending_events",
                "gauge",
                "Webhook events not yet delivered (retrying ones included, dead ones not).",
            );
            let _ = writeln!(out, "keyward_webhook_pending_events {pending}");
            header(
                &mut out,
                "keyward_webhook_oldest_pending_age_seconds",
                "gauge",
                "Age of the oldest webhook event not yet delivered (0 when none).",
            );
            let _ = writeln!(out, "keyward_webhook_oldest_pending_age_seconds {oldest_age}");
        }
        process::render(&mut out);
        out
    }
}

/// The gateway process's own figures, from `/proc/self` (Linux): CPU time, memory, open
/// descriptors and start time, under the names Prometheus' client libraries use.
mod process {
    use std::fmt::Write as _;

    use super::header;

    /// Fields of `/proc/self/stat` after the command name: (utime, stime, starttime, vsize,
    /// rss) in clock ticks, ticks, ticks since boot, bytes, pages.
    fn stat() -> Option<(u64, u64, u64, u64, u64)> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name is in parentheses and may hold spaces: read after the last ')'.
        let (_, rest) = text.rsplit_once(')')?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3 (state): field n is f[n - 3].
        let n = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
        Some((n(14)?, n(15)?, n(22)?, n(23)?, n(24)?))
    }

    fn boot_time() -> Option<u64> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse().ok())
    }

    fn max_fds() -> Option<u64> {
        let text = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = text.lines().find(|l| l.starts_with("Max open files"))?;
        line.split_whitespace().nth(3)?.parse().ok()
    }

    pub(super) fn render(out: &mut String) {
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        let page = rustix::param::page_size() as u64;
        if let Some((utime, stime, start, vsize, rss)) = stat() {
            header(
                out,
                "process_cpu_seconds_total",
                "counter",
                "Total user and system CPU time spent in seconds.",
            );
            let _ = writeln!(out, "process_cpu_seconds_total {:.2}", (utime + stime) as f64 / ticks);
            header(
                out,
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
            );
            let _ = writeln!(out, "process_resident_memory_bytes {}", rss.saturating_mul(page));
            header(
                out,
                "process_virtual_memory_bytes",
                "gauge",
                "Virtual memory size in bytes.",
            );
            let _ = writeln!(out, "process_virtual_memory_bytes {vsize}");
            if let Some(boot) = boot_time() {
                header(
                    out,
                    "process_start_time_seconds",
                    "gauge",
                    "Start time of the process since unix epoch in seconds.",
                );
                let _ = writeln!(
                    out,
                    "process_start_time_seconds {:.2}",
                    boot as f64 + start as f64 / ticks
                );
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            header(out, "process_open_fds", "gauge", "Number of open file descriptors.");
            let _ = writeln!(out, "process_open_fds {}", fds.count());
        }
        if let Some(max) = max_fds() {
            header(
                out,
                "process_max_fds",
                "gauge",
                "Maximum number of open file descriptors.",
            );
            let _ = writeln!(out, "process_max_fds {max}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_complete() {
        let m = Metrics::default();
        m.record_http("GET", "/v1/me", 200, 700);
        m.record_http("GET", "/v1/me", 200, 30_000);
        let text = m.render();
        let line = |s: &str| text.lines().find(|l| l.starts_with(s)).unwrap_or_default().to_owned();
        let l = "keyward_http_request_duration_seconds_bucket{method=\"GET\",route=\"/v1/me\",status=\"200\"";
        assert!(line(&format!("{l},le=\"0.0005\"}}")).ends_with(" 0"));
        assert!(line(&format!("{l},le=\"0.001\"}}")).ends_with(" 1"));
        assert!(line(&format!("{l},le=\"0.05\"}}")).ends_with(" 2"));
        assert!(line(&format!("{l},le=\"+Inf\"}}")).ends_with(" 2"));
        assert!(text
            .contains("keyward_http_request_duration_seconds_count{method=\"GET\",route=\"/v1/me\",status=\"200\"} 2"));
        assert!(text.contains("# TYPE keyward_http_request_duration_seconds histogram"));
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{name} "))),
                "{name}:\n{text}"
            );
        }
    }
}
