//! Fake Anthropic, OpenAI and Google endpoints on loopback, for tests and benchmarks.
//!
//! Owns: one axum server that answers like the three providers — their request validation,
//! answers, event streams, error envelopes, status codes and request ids — for keys the test
//! registers, each with a [`Behaviour`] (answer, fail in a given way, stall, drop the
//! connection, redirect, stream slowly…). The providers' routes do not collide, so one base URL
//! serves all three: point `KEYWARD_{ANTHROPIC,OPENAI,GOOGLE}_BASE_URL` at [`FakeProviders::base_url`].
//!
//! Every request except the control calls is recorded ([`RecordedRequest`]), including those a
//! client sends to `/_fake/stolen` after following a [`Behaviour::Redirect`].
//!
//! Control, in process ([`FakeProviders::set_key`], [`FakeProviders::requests`],
//! [`FakeProviders::clear_requests`]) or over HTTP for tests in other languages:
//! - `POST /_fake/keys` `{"key", "behaviour", "delay_ms"?, "provider"?}` → `200 {"ok": true}`;
//!   `behaviour` is one of [`Behaviour::NAMES`]; `delay_ms` is the gap between chunks for
//!   `slow_stream` (default 100) and the whole stream's length for `long_stream` (default
//!   2000); `provider` limits the key to one provider.
//! - `DELETE /_fake/keys` forgets every key.
//! - `GET /_fake/requests` → `{"requests": [{"method", "path", "query", "headers": {name: value}, "body"}]}`
//!   (`body` as UTF-8, lossy); `DELETE /_fake/requests` forgets them.
//! - `GET /_fake/healthz` → `ok`.
//!
//! - `POST /_fake/models` `{"provider", "model", "available"}` → `200 {"ok": true}`: takes a
//!   model away from a provider (a retirement: calls get its not-found error, listings leave
//!   it out) or serves it again.
//!
//! Keys arrive only in each provider's header (`x-api-key`, `Authorization: Bearer`,
//! `x-goog-api-key`); a key anywhere else (a `?key=` query) counts as missing. An unregistered
//! key gets the provider's real invalid-key error. Google refuses every standard (`AIza…`)
//! key, registered or not, as it does since September 2026: only auth keys (`AQ.…`) work.
//!
//! The providers answer as they do today (December 2026): each serves its current models
//! ([`models`]), answers a retired one with its own not-found error, and Anthropic and OpenAI
//! send their rate-limit headers on every answer to a known key.
//!
//! Must never: log per request or hold a lock across an `.await` (the fake is used in
//! benchmarks).

mod anthropic;
mod google;
pub mod models;
mod openai;
mod server;
mod state;
mod wire;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keyward_core::Provider;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use state::RecordedRequest;

/// How the fake answers requests made with a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Behaviour {
    /// A deterministic answer: "Hello from fake {provider}." cut to `max_tokens` words.
    Ok,
    /// Anthropic 400 "credit balance is too low"; OpenAI 429 `insufficient_quota`; Google 429
    /// `RESOURCE_EXHAUSTED` "Your prepayment credits are depleted".
    NoCredit,
    /// 403: `permission_error` / permission message / `PERMISSION_DENIED`.
    MissingPermission,
    /// 429: `rate_limit_error` / `rate_limit_exceeded` / `RESOURCE_EXHAUSTED` quota per minute.
    RateLimited,
    /// Anthropic 529 `overloaded_error`; OpenAI 503; Google 503 `UNAVAILABLE`.
    Unavailable,
    /// Accept the request and never answer (until the fake shuts down).
    Stall,
    /// Close the connection without answering.
    Drop,
    /// Send the status, headers and about half the body (or stream), then close the connection.
    DropMidStream,
    /// 200 with an HTML page instead of JSON.
    Garbage,
    /// 200 with the first half of the JSON body (or the first half of the stream, ended cleanly).
    Truncated,
    /// 307 to `/_fake/stolen` on the fake, which records whatever follows it.
    Redirect,
    /// The provider's invalid-key error with the full key in its message, like a careless provider.
    EchoKey,
    /// An `Ok` answer with this pause between stream chunks (a plain answer waits it once).
    SlowStream(Duration),
    /// An `Ok` answer whose stream lasts this long, like a model writing: the chunks up to
    /// the first text go at once, the rest are spread evenly over the duration (a plain
    /// answer waits it once). For load that holds many streams open (the soak benchmark).
    LongStream(Duration),
    /// Google: 403 "Your API key was reported as leaked"; Anthropic and OpenAI revoke a
    /// leaked key, so it gets their invalid-key error.
    Leaked,
    /// Google: 403 `CONSUMER_SUSPENDED` (quoting the key, as Google does); Anthropic 403
    /// "This organization has been disabled."; OpenAI its missing-permission error.
    Suspended,
    /// Google: 401 `ACCESS_TOKEN_TYPE_UNSUPPORTED`; the others their invalid-key error.
    KeyTypeUnsupported,
}

impl Behaviour {
    /// The names the HTTP control API takes, in declaration order.
    pub const NAMES: [&'static str; 17] = [
        "ok",
        "no_credit",
        "missing_permission",
        "rate_limited",
        "unavailable",
        "stall",
        "drop",
        "drop_mid_stream",
        "garbage",
        "truncated",
        "redirect",
        "echo_key",
        "slow_stream",
        "leaked",
        "suspended",
        "key_type_unsupported",
        "long_stream",
    ];

    /// Default gap between chunks for `slow_stream` when `delay_ms` is not given.
    pub const DEFAULT_DELAY: Duration = Duration::from_millis(100);

    /// Default length of a `long_stream` when `delay_ms` is not given.
    pub const DEFAULT_LONG_STREAM: Duration = Duration::from_secs(2);

    pub fn name(self) -> &'static str {
        match self {
            Behaviour::Ok => "ok",
            Behaviour::NoCredit => "no_credit",
            Behaviour::MissingPermission => "missing_permission",
            Behaviour::RateLimited => "rate_limited",
            Behaviour::Unavailable => "unavailable",
            Behaviour::Stall => "stall",
            Behaviour::Drop => "drop",
            Behaviour::DropMidStream => "drop_mid_stream",
            Behaviour::Garbage => "garbage",
            Behaviour::Truncated => "truncated",
            Behaviour::Redirect => "redirect",
            Behaviour::EchoKey => "echo_key",
            Behaviour::SlowStream(_) => "slow_stream",
            Behaviour::Leaked => "leaked",
            Behaviour::Suspended => "suspended",
            Behaviour::KeyTypeUnsupported => "key_type_unsupported",
            Behaviour::LongStream(_) => "long_stream",
        }
    }

    /// The marker words a key may hold in "any key" mode ([`FakeProviders::accept_any_key`]),
    /// checked in this order (case and `-`/`_` ignored), with what each makes the fake do;
    /// a key with none of them answers normally.
    pub const MARKERS: [(&'static str, &'static str); 11] = [
        ("invalid", "the provider's invalid-key error"),
        ("leaked", "Google: \"reported as leaked\" (the others: invalid key)"),
        ("suspended", "Google: the key's project is suspended"),
        ("keytype", "Google: ACCESS_TOKEN_TYPE_UNSUPPORTED"),
        (
            "nocredit",
            "no credit left (Anthropic 400, OpenAI 429 insufficient_quota, Google 429)",
        ),
        ("noperm", "missing permission"),
        ("ratelimited", "rate limited (429)"),
        ("unavailable", "overloaded (Anthropic 529, OpenAI and Google 503)"),
        (
            "echo",
            "an invalid-key error that quotes the key back (keyward masks it)",
        ),
        ("slow", "a normal answer, streamed with a pause between chunks"),
        ("garbage", "HTML instead of JSON"),
    ];

    /// What a key's marker word asks for: `None` for an `invalid` key (unknown to the
    /// provider), else the first marker's behaviour, `Ok` without one.
    pub fn from_marker(key: &str) -> Option<Behaviour> {
        let plain: String = key
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .flat_map(char::to_lowercase)
            .collect();
        let word = Behaviour::MARKERS
            .iter()
            .find(|(w, _)| plain.contains(w))
            .map(|(w, _)| *w);
        Some(match word {
            Some("invalid") => return None,
            Some("leaked") => Behaviour::Leaked,
            Some("suspended") => Behaviour::Suspended,
            Some("keytype") => Behaviour::KeyTypeUnsupported,
            Some("nocredit") => Behaviour::NoCredit,
            Some("noperm") => Behaviour::MissingPermission,
            Some("ratelimited") => Behaviour::RateLimited,
            Some("unavailable") => Behaviour::Unavailable,
            Some("echo") => Behaviour::EchoKey,
            Some("slow") => Behaviour::SlowStream(Behaviour::DEFAULT_DELAY),
            Some("garbage") => Behaviour::Garbage,
            _ => Behaviour::Ok,
        })
    }

    /// Parses a control-API name; `delay_ms` only matters for `slow_stream` (the gap) and
    /// `long_stream` (the whole length).
    pub fn parse(name: &str, delay_ms: Option<u64>) -> Option<Behaviour> {
        Some(match name {
            "ok" => Behaviour::Ok,
            "no_credit" => Behaviour::NoCredit,
            "missing_permission" => Behaviour::MissingPermission,
            "rate_limited" => Behaviour::RateLimited,
            "unavailable" => Behaviour::Unavailable,
            "stall" => Behaviour::Stall,
            "drop" => Behaviour::Drop,
            "drop_mid_stream" => Behaviour::DropMidStream,
            "garbage" => Behaviour::Garbage,
            "truncated" => Behaviour::Truncated,
            "redirect" => Behaviour::Redirect,
            "echo_key" => Behaviour::EchoKey,
            "slow_stream" => Behaviour::SlowStream(delay_ms.map_or(Behaviour::DEFAULT_DELAY, Duration::from_millis)),
            "leaked" => Behaviour::Leaked,
            "suspended" => Behaviour::Suspended,
            "key_type_unsupported" => Behaviour::KeyTypeUnsupported,
            "long_stream" => {
                Behaviour::LongStream(delay_ms.map_or(Behaviour::DEFAULT_LONG_STREAM, Duration::from_millis))
            }
            _ => return None,
        })
    }
}

/// The fake providers, serving on loopback until dropped.
pub struct FakeProviders {
    shared: Arc<state::Shared>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    _task: JoinHandle<()>,
}

impl fmt::Debug for FakeProviders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeProviders")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeProviders {
    /// Binds `127.0.0.1:0` and serves on the current tokio runtime (call it inside one).
    pub fn start() -> io::Result<FakeProviders> {
        FakeProviders::start_on(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Binds `addr` and serves on the current tokio runtime.
    pub fn start_on(addr: SocketAddr) -> io::Result<FakeProviders> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| io::Error::other(format!("FakeProviders must start inside a tokio runtime: {e}")))?;
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let addr = listener.local_addr()?;
        let (shutdown, stop) = watch::channel(false);
        let shared = Arc::new(state::Shared::new(format!("http://{addr}"), stop.clone()));
        let task = runtime.spawn(server::serve(listener, Arc::clone(&shared), stop));
        Ok(FakeProviders {
            shared,
            addr,
            shutdown,
            _task: task,
        })
    }

    /// `http://127.0.0.1:PORT`, no trailing slash: the base URL of all three providers.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Registers `key` with `behaviour` for one provider, or for all with `None`. A
    /// provider-specific entry wins over an all-provider one.
    pub fn set_key(&self, provider: impl Into<Option<Provider>>, key: &str, behaviour: Behaviour) {
        self.shared.set_key(provider.into(), key, behaviour);
    }

    /// Forgets `key` for one provider, or entirely with `None`.
    pub fn remove_key(&self, provider: impl Into<Option<Provider>>, key: &str) {
        self.shared.remove_key(provider.into(), key);
    }

    /// Every request received so far (oldest first; the last 10 000 are kept).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests()
    }

    /// The requests that reached `/_fake/stolen` (by following a redirect).
    pub fn stolen_requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .requests()
            .into_iter()
            .filter(|r| r.path == server::STOLEN_PATH)
            .collect()
    }

    pub fn clear_requests(&self) {
        self.shared.clear_requests();
    }

    /// Takes `model` away from `provider` (`available: false`, as a retirement does) or
    /// serves it (again).
    pub fn set_model_available(&self, provider: Provider, model: &str, available: bool) {
        self.shared.set_model_available(provider, model, available);
    }

    /// "Any key" mode (`keyward demo`): a key the test did not register answers as its marker
    /// words say ([`Behaviour::from_marker`]) instead of with the invalid-key error. Google
    /// still refuses standard (`AIza…`) keys.
    pub fn accept_any_key(&self, on: bool) {
        self.shared.set_any_key(on);
    }

    /// Turns recording on or off (on by default); off saves memory in long benchmarks.
    pub fn set_recording(&self, on: bool) {
        self.shared.set_recording(on);
    }
}

impl Drop for FakeProviders {
    /// Stops accepting, ends stalled and slow answers, and closes idle connections.
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}
