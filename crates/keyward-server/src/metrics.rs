//! Prometheus metrics, rendered by hand: a few counters do not need a metrics framework.
//! Labels are route templates and status codes only: never a path with ids, never a key.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Metrics {
    http: Mutex<BTreeMap<(String, String, u16), HttpStat>>,
    key_actions: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    worker_restarts: std::sync::atomic::AtomicU64,
    ai_calls: Mutex<BTreeMap<(&'static str, &'static str, String), u64>>,
    probes: Mutex<BTreeMap<(&'static str, String), u64>>,
    ai_latency: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
    /// Catalogued models a provider said do not exist: count, and when last logged.
    model_not_found: Mutex<BTreeMap<(&'static str, String), GoneModel>>,
}

/// How often a provider said one catalogued model does not exist, and when it was last logged.
type GoneModel = (u64, Option<std::time::Instant>);

/// How often a model the provider no longer has is logged (every time is counted).
const MODEL_NOT_FOUND_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Upper bounds of the AI-call latency buckets, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Debug, Default, Clone)]
struct Histogram {
    buckets: [u64; 12],
    count: u64,
    sum: f64,
}

#[derive(Debug, Default, Clone, Copy)]
struct HttpStat {
    count: u64,
    micros_sum: u64,
}

impl Metrics {
    pub fn record_http(&self, method: &str, route: &str, status: u16, micros: u64) {
        if let Ok(mut m) = self.http.lock() {
            let s = m.entry((method.to_owned(), route.to_owned(), status)).or_default();
            s.count += 1;
            s.micros_sum = s.micros_sum.saturating_add(micros);
        }
    }

    pub fn record_key_action(&self, action: &'static str, provider: &'static str) {
        if let Ok(mut m) = self.key_actions.lock() {
            *m.entry((action, provider)).or_default() += 1;
        }
    }

    /// One AI call by provider, key source and outcome (`ok`, `error:<diagnosis>`, `refused:<code>`).
    pub fn record_ai_call(&self, provider: keyward_core::Provider, source: keyward_core::KeySource, outcome: &str) {
        if let Ok(mut m) = self.ai_calls.lock() {
            *m.entry((provider.as_str(), source.as_str(), outcome.to_owned()))
                .or_default() += 1;
        }
    }

    /// How long an AI call took, end to end through keyward.
    pub fn observe_ai_latency(&self, provider: keyward_core::Provider, source: keyward_core::KeySource, seconds: f64) {
        if let Ok(mut m) = self.ai_latency.lock() {
            let h = m.entry((provider.as_str(), source.as_str())).or_default();
            for (bucket, bound) in h.buckets.iter_mut().zip(LATENCY_BUCKETS) {
                if seconds <= bound {
                    *bucket += 1;
                }
            }
            h.count += 1;
            h.sum += seconds;
        }
    }

    pub fn record_probe(&self, provider: keyward_core::Provider, outcome: &str) {
        if let Ok(mut m) = self.probes.lock() {
            *m.entry((provider.as_str(), outcome.to_owned())).or_default() += 1;
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

    pub fn record_worker_restart(&self) {
        self.worker_restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP keyward_worker_restarts_total Worker processes that exited and were restarted.\n");
        out.push_str("# TYPE keyward_worker_restarts_total counter\n");
        let _ = writeln!(
            out,
            "keyward_worker_restarts_total {}",
            self.worker_restarts.load(std::sync::atomic::Ordering::Relaxed)
        );
        out.push_str("# HELP keyward_http_requests_total HTTP requests by method, route template and status.\n");
        out.push_str("# TYPE keyward_http_requests_total counter\n");
        let http = self.http.lock().map(|m| m.clone()).unwrap_or_default();
        for ((method, route, status), s) in &http {
            let _ = writeln!(
                out,
                "keyward_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {}",
                s.count
            );
        }
        out.push_str("# HELP keyward_http_request_duration_seconds_sum Total time spent answering, by route.\n");
        out.push_str("# TYPE keyward_http_request_duration_seconds_sum counter\n");
        for ((method, route, status), s) in &http {
            let _ = writeln!(
                out,
                "keyward_http_request_duration_seconds_sum{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {:.6}",
                s.micros_sum as f64 / 1e6
            );
        }
        out.push_str("# HELP keyward_ai_calls_total AI calls by provider, key source and outcome.\n");
        out.push_str("# TYPE keyward_ai_calls_total counter\n");
        let calls = self.ai_calls.lock().map(|m| m.clone()).unwrap_or_default();
        for ((provider, source, outcome), n) in &calls {
            let _ = writeln!(
                out,
                "keyward_ai_calls_total{{provider=\"{provider}\",source=\"{source}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        out.push_str("# HELP keyward_ai_call_duration_seconds AI call latency through keyward.\n");
        out.push_str("# TYPE keyward_ai_call_duration_seconds histogram\n");
        let latency = self.ai_latency.lock().map(|m| m.clone()).unwrap_or_default();
        for ((provider, source), h) in &latency {
            let labels = format!("provider=\"{provider}\",source=\"{source}\"");
            for (n, bound) in h.buckets.iter().zip(LATENCY_BUCKETS) {
                let _ = writeln!(
                    out,
                    "keyward_ai_call_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "keyward_ai_call_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "keyward_ai_call_duration_seconds_sum{{{labels}}} {:.6}", h.sum);
            let _ = writeln!(out, "keyward_ai_call_duration_seconds_count{{{labels}}} {}", h.count);
        }
        out.push_str(
            "# HELP keyward_model_not_found_total Calls and key tests on a catalogued model that the provider says does not exist.\n",
        );
        out.push_str("# TYPE keyward_model_not_found_total counter\n");
        let gone = self.model_not_found.lock().map(|m| m.clone()).unwrap_or_default();
        for ((provider, model), (n, _)) in &gone {
            let _ = writeln!(
                out,
                "keyward_model_not_found_total{{provider=\"{provider}\",model=\"{model}\"}} {n}"
            );
        }
        out.push_str("# HELP keyward_key_tests_total Key tests by provider and outcome.\n");
        out.push_str("# TYPE keyward_key_tests_total counter\n");
        let probes = self.probes.lock().map(|m| m.clone()).unwrap_or_default();
        for ((provider, outcome), n) in &probes {
            let _ = writeln!(
                out,
                "keyward_key_tests_total{{provider=\"{provider}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        out.push_str("# HELP keyward_key_actions_total Key-management actions by action and provider.\n");
        out.push_str("# TYPE keyward_key_actions_total counter\n");
        let keys = self.key_actions.lock().map(|m| m.clone()).unwrap_or_default();
        for ((action, provider), n) in &keys {
            let _ = writeln!(
                out,
                "keyward_key_actions_total{{action=\"{action}\",provider=\"{provider}\"}} {n}"
            );
        }
        out
    }
}
