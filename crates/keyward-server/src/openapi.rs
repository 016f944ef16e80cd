//! The OpenAPI 3.1 document of keyward's own JSON API, served at `GET /openapi.json`.
//!
//! Generated from the code: the paths come from the `#[utoipa::path]` annotations on the
//! handlers, and the router for those routes is built from the same annotations
//! ([`api_router`]), so a route cannot exist without being documented; the bodies are the
//! types of [`crate::api`], which the handlers serialize. The native pass-through routes
//! are the providers' own APIs and the settings page is HTML: neither is in it.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;
use crate::routes;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "keyward",
        description = "Bring-your-own-key vault and gateway for AI model keys (Aiemaily). Authenticate with `Authorization: Bearer kw_…`.",
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "me", description = "The caller"),
        (name = "model keys", description = "Save, rotate, remove, switch and test provider keys"),
        (name = "ai", description = "AI calls, metered and audited"),
        (name = "usage and audit"),
        (name = "operations"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("kw_…")
                    .build(),
            ),
        );
    }
}

/// The documented routes, and the document itself.
pub fn api_router() -> (axum::Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::<AppState>::with_openapi(ApiDoc::openapi())
        .routes(routes!(routes::ops::healthz))
        .routes(routes!(routes::ops::readyz))
        .routes(routes!(routes::me::me))
        .routes(routes!(routes::model_keys::list))
        .routes(routes!(routes::model_keys::save, routes::model_keys::remove))
        .routes(routes!(routes::model_keys::set_source))
        .routes(routes!(routes::key_test::test_key))
        .routes(routes!(routes::ai::messages))
        .routes(routes!(routes::usage::usage))
        .routes(routes!(routes::audit::list))
        .split_for_parts()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_json_route_is_documented_with_its_bodies() {
        let (_, doc) = api_router();
        let json = doc.to_json().unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(v["openapi"].as_str().unwrap().starts_with("3.1"));
        let paths = v["paths"].as_object().unwrap();
        for (path, methods) in [
            ("/v1/me", &["get"][..]),
            ("/v1/accounts/{account_id}/model-keys", &["get"]),
            ("/v1/accounts/{account_id}/model-keys/{provider}", &["put", "delete"]),
            ("/v1/accounts/{account_id}/model-keys/{provider}/source", &["put"]),
            ("/v1/accounts/{account_id}/model-keys/{provider}/test", &["post"]),
            ("/v1/accounts/{account_id}/ai/messages", &["post"]),
            ("/v1/accounts/{account_id}/usage", &["get"]),
            ("/v1/accounts/{account_id}/audit", &["get"]),
            ("/healthz", &["get"]),
            ("/readyz", &["get"]),
        ] {
            for m in methods {
                assert!(paths[path][m].is_object(), "{m} {path} is not documented");
            }
        }
        let schemas = v["components"]["schemas"].as_object().unwrap();
        for s in [
            "ProviderStateBody",
            "ErrorBody",
            "AuditEventBody",
            "UsageBody",
            "KeyTestBody",
            "AiAnswerBody",
        ] {
            assert!(schemas.contains_key(s), "schema {s} missing");
        }
    }
}
