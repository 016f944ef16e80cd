//! Liveness, readiness and metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;

use crate::api::{HealthBody, ReadyBody};
use crate::state::AppState;

#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "The process is up", body = HealthBody)))]
pub async fn healthz() -> Json<HealthBody> {
    Json(HealthBody { ok: true })
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Database, at least one worker and the KEK backend ready", body = ReadyBody),
        (status = 503, description = "Not ready", body = ReadyBody),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<ReadyBody>) {
    let database = state.engine.store.ping().await.is_ok();
    let workers = state.engine.workers.ready();
    let kek = state.kek_probe.check(&state.engine).await;
    let ready = database && workers > 0 && kek.status == "ok";
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = ReadyBody {
        ready,
        database: if database { "ok" } else { "unavailable" }.to_owned(),
        workers_ready: workers,
        kek,
    };
    (status, Json(body))
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.engine.metrics.render(),
    )
}
