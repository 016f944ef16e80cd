//! The fake's shared state: registered keys, recorded requests, id counter, known models.
//! Locks are std locks held for a few instructions, never across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};

use axum::http::HeaderMap;
use keyward_core::Provider;
use serde_json::{json, Map, Value};
use tokio::sync::watch;

use crate::models::{Served, ServedModel};
use crate::Behaviour;

/// How many recorded requests are kept; older ones are dropped first.
const MAX_RECORDED: usize = 10_000;

/// One request as the fake received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    /// The raw path, without the query.
    pub path: String,
    pub query: Option<String>,
    /// Header names in lower case, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn body_json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    pub(crate) fn to_json(&self) -> Value {
        let mut headers = Map::new();
        for (k, v) in &self.headers {
            match headers.get_mut(k) {
                Some(Value::String(existing)) => {
                    existing.push_str(", ");
                    existing.push_str(v);
                }
                _ => {
                    headers.insert(k.clone(), Value::String(v.clone()));
                }
            }
        }
        json!({
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": headers,
            "body": String::from_utf8_lossy(&self.body),
        })
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct KeyEntry {
    any: Option<Behaviour>,
    anthropic: Option<Behaviour>,
    openai: Option<Behaviour>,
    google: Option<Behaviour>,
}

impl KeyEntry {
    fn slot(&mut self, provider: Option<Provider>) -> &mut Option<Behaviour> {
        match provider {
            None => &mut self.any,
            Some(Provider::Anthropic) => &mut self.anthropic,
            Some(Provider::OpenAi) => &mut self.openai,
            Some(Provider::Google) => &mut self.google,
        }
    }

    fn get(&self, provider: Provider) -> Option<Behaviour> {
        let own = match provider {
            Provider::Anthropic => self.anthropic,
            Provider::OpenAi => self.openai,
            Provider::Google => self.google,
        };
        own.or(self.any)
    }

    fn is_empty(&self) -> bool {
        self.any.is_none() && self.anthropic.is_none() && self.openai.is_none() && self.google.is_none()
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub base_url: String,
    pub shutdown: watch::Receiver<bool>,
    served: RwLock<Served>,
    keys: RwLock<HashMap<String, KeyEntry>>,
    requests: Mutex<VecDeque<RecordedRequest>>,
    recording: AtomicBool,
    any_key: AtomicBool,
    counter: AtomicU64,
}

impl Shared {
    pub(crate) fn new(base_url: String, shutdown: watch::Receiver<bool>) -> Shared {
        Shared {
            base_url,
            shutdown,
            served: RwLock::new(Served::default()),
            keys: RwLock::new(HashMap::new()),
            requests: Mutex::new(VecDeque::new()),
            recording: AtomicBool::new(true),
            any_key: AtomicBool::new(false),
            counter: AtomicU64::new(1),
        }
    }

    /// A fresh number for ids (message ids, request ids).
    pub(crate) fn next_id(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn set_key(&self, provider: Option<Provider>, key: &str, behaviour: Behaviour) {
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        *keys.entry(key.to_owned()).or_default().slot(provider) = Some(behaviour);
    }

    pub(crate) fn remove_key(&self, provider: Option<Provider>, key: &str) {
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        match provider {
            None => {
                keys.remove(key);
            }
            Some(p) => {
                if let Some(entry) = keys.get_mut(key) {
                    *entry.slot(Some(p)) = None;
                    if entry.is_empty() {
                        keys.remove(key);
                    }
                }
            }
        }
    }

    pub(crate) fn clear_keys(&self) {
        self.keys.write().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// What `key` does at `provider`; `None` for an unregistered key (in "any key" mode, what
    /// its marker words say).
    pub(crate) fn behaviour(&self, provider: Provider, key: &str) -> Option<Behaviour> {
        let registered = {
            let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
            keys.get(key).and_then(|e| e.get(provider))
        };
        match registered {
            Some(b) => Some(b),
            None if self.any_key.load(Ordering::Relaxed) => Behaviour::from_marker(key),
            None => None,
        }
    }

    pub(crate) fn set_any_key(&self, on: bool) {
        self.any_key.store(on, Ordering::Relaxed);
    }

    pub(crate) fn set_recording(&self, on: bool) {
        self.recording.store(on, Ordering::Relaxed);
    }

    pub(crate) fn record(&self, method: &str, path: &str, query: Option<&str>, headers: &HeaderMap, body: &[u8]) {
        if !self.recording.load(Ordering::Relaxed) {
            return;
        }
        let request = RecordedRequest {
            method: method.to_owned(),
            path: path.to_owned(),
            query: query.map(str::to_owned),
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
        };
        let mut requests = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        if requests.len() >= MAX_RECORDED {
            requests.pop_front();
        }
        requests.push_back(request);
    }

    pub(crate) fn requests(&self) -> Vec<RecordedRequest> {
        let requests = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        requests.iter().cloned().collect()
    }

    pub(crate) fn clear_requests(&self) {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// Whether `model` is one this provider serves now.
    pub(crate) fn knows_model(&self, provider: Provider, model: &str) -> bool {
        self.served
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .serves(provider, model)
    }

    /// The models this provider lists now.
    pub(crate) fn served_models(&self, provider: Provider) -> Vec<ServedModel> {
        self.served
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .list(provider)
    }

    pub(crate) fn set_model_available(&self, provider: Provider, model: &str, available: bool) {
        self.served
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .set(provider, model, available);
    }
}
