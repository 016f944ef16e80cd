//! [`AppState`]: what the HTTP handlers are given: the [`Engine`], the web UI's state and
//! the HTTP layer's own limits.

use std::sync::Arc;

use crate::engine::Engine;
use crate::kek_probe::KekProbe;
use crate::web::WebState;

/// Everything a handler may use. One reference count to clone: axum clones the state for
/// every extractor and middleware of every request, and with a field-by-field clone that
/// was a dozen contended atomic increments and decrements per request.
#[derive(Clone)]
pub struct AppState(Arc<AppStateInner>);

impl AppState {
    pub fn new(inner: AppStateInner) -> AppState {
        AppState(Arc::new(inner))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppStateInner;
    fn deref(&self) -> &AppStateInner {
        &self.0
    }
}

pub struct AppStateInner {
    pub engine: Engine,
    pub max_body_bytes: usize,
    pub max_ai_body_bytes: usize,
    /// `/metrics` on the API's listener (false when `KEYWARD_METRICS_LISTEN` serves it apart).
    pub metrics_on_api: bool,
    /// The settings page: sessions, login codes, the login limiter, TLS or not.
    pub web: Arc<WebState>,
    /// `/readyz`'s check of the KEK backend.
    pub kek_probe: Arc<KekProbe>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Debug for AppStateInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}
