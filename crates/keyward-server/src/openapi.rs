//! The OpenAPI 3.1 document of keyward's own JSON API, served at `GET /openapi.json`.
//!
//! Generated from the code: the paths come from the `#[utoipa::path]` annotations on the
//! handlers, and the router for those routes is built from the same annotations
//! ([`api_router`]), so a route cannot exist without being documented; the bodies are the
//! types of [`crate::api`], which the handlers serialize. The native pass-through routes
//! carry the providers' own APIs: they are listed (tag "native pass-through") with their
//! paths and what keyward checks, their bodies and answers being the provider's (see each
//! provider's reference). The settings page is HTML and is not in it. `servers` is this
//! keyward itself (`/`, relative to where the document was fetched).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::routes;
use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "keyward",
        description = "Bring-your-own-key vault and gateway for AI model keys (Aiemaily). Authenticate with `Authorization: Bearer kw_…` (a user) or `Bearer kws_…` (one of the product's services, within its scopes: `ai:call`, `accounts:manage`, `audit:read`).",
    ),
    servers((url = "/", description = "this keyward (the URL the document was fetched from)")),
    modifiers(&BearerAuth, &NativePassThrough),
    tags(
        (name = "me", description = "The caller"),
        (name = "model keys", description = "Save, rotate, remove, switch and test provider keys"),
        (name = "ai", description = "AI calls, metered and audited"),
        (name = "usage and audit"),
        (name = "operations"),
        (name = "provisioning", description = "Accounts, users and memberships keyed by the product's own ids: a service token with the accounts:manage scope. Every call is idempotent."),
        (name = "native pass-through", description = "Each provider's own API, for its official SDK: base URL `/v1/accounts/{account_id}/providers/{provider}`, a keyward token as the API key in the SDK's own header (`x-api-key`, `Authorization: Bearer`, `x-goog-api-key`). Bodies and answers are the provider's; keyward's refusals use the provider's error format."),
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
                    .bearer_format("kw_… (a user) or kws_… (a service)")
                    .build(),
            ),
        );
    }
}

/// The pass-through routes, documented by hand: their bodies are the providers' own.
struct NativePassThrough;

impl Modify for NativePassThrough {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
        use utoipa::openapi::request_body::RequestBodyBuilder;
        use utoipa::openapi::{ContentBuilder, ObjectBuilder, Required, ResponseBuilder};

        let object = || {
            ObjectBuilder::new()
                .description(Some("the provider's own JSON"))
                .build()
        };
        let json = || ContentBuilder::new().schema(Some(object())).build();
        let path_param = |name: &str, what: &str| {
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some(what))
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(utoipa::openapi::schema::Type::String)
                        .build(),
                ))
                .build()
        };
        let answer = |what: &str| {
            ResponseBuilder::new()
                .description(what)
                .content("application/json", json())
                .build()
        };
        let refusals = [
            ("400", "The body is not JSON (the provider's error format)"),
            ("401", "No or unknown keyward token (the provider's error format)"),
            (
                "403",
                "A service token without the ai:call scope (the provider's error format)",
            ),
            (
                "404",
                "Not a member of this account (a service: no such account; an acting user who is not a member), or an API keyward does not carry (the provider's error format)",
            ),
            (
                "409",
                "Own key selected but none saved, or reported as leaked (the provider's error format)",
            ),
            ("413", "Body too large"),
            (
                "422",
                "A model that is retired, unknown or of another kind, or a bad bound (the provider's error format)",
            ),
            ("429", "Shared-pool credits spent (the provider's error format)"),
            (
                "503",
                "No worker, no database, or no shared key for this provider (the provider's error format)",
            ),
        ];
        let header_param = |name: &str, what: &str| {
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(what))
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(utoipa::openapi::schema::Type::String)
                        .build(),
                ))
                .build()
        };
        let operation = |summary: &str, has_body: bool, google: bool, featured: bool| {
            let what = if has_body {
                "keyward checks the token and membership, the model against its catalogue and the shared pool's credits, then puts the account's real key (own or shared) in place of the token; the call is metered and audited. Streamed answers are relayed as they arrive."
            } else {
                "Answered from keyward's catalogue (the models keyward offers); nothing is sent to the provider."
            };
            let mut op = OperationBuilder::new()
                .tag("native pass-through")
                .summary(Some(summary))
                .description(Some(format!(
                    "{summary}, as the provider's official SDK calls it. {what}"
                )))
                .parameter(path_param("account_id", "The account (acc_…)"))
                .parameter(header_param(
                    "keyward-feature",
                    "The product feature (1 to 64 of A-Z a-z 0-9 _ - .), audited",
                ))
                .parameter(header_param(
                    "keyward-on-behalf-of",
                    "Service tokens only: the member the call is for (usr_… or the product's external user id), audited",
                ))
                .response(
                    "200",
                    answer("The provider's answer (JSON, or text/event-stream when streamed), relayed as it arrives"),
                );
            if featured {
                op = op.parameter(path_param(
                    "feature",
                    "The product feature (1 to 64 of A-Z a-z 0-9 _ - .), audited: the SDK-friendly form of keyward-feature",
                ));
            }
            if google {
                op = op.parameter(path_param(
                    "model_action",
                    "{model}:generateContent, or {model}:streamGenerateContent with ?alt=sse",
                ));
            }
            if has_body {
                op = op.request_body(Some(
                    RequestBodyBuilder::new()
                        .content("application/json", json())
                        .required(Some(Required::True))
                        .build(),
                ));
            }
            for (status, what) in refusals {
                op = op.response(status, answer(what));
            }
            op.build()
        };
        for (base, featured) in [
            ("/v1/accounts/{account_id}/providers", false),
            ("/v1/accounts/{account_id}/features/{feature}/providers", true),
        ] {
            for api in keyward_providers::NativeApi::ALL {
                let google = api.route().contains("{model_action}");
                openapi.paths.add_path_operation(
                    format!("{base}/{}", api.route()),
                    vec![HttpMethod::Post],
                    operation(api.summary(), true, google, featured),
                );
            }
            for provider in keyward_core::Provider::ALL {
                for route in keyward_providers::model_list_routes(provider) {
                    let summary = format!("The {} models keyward offers", provider.display_name());
                    openapi.paths.add_path_operation(
                        format!("{base}/{route}"),
                        vec![HttpMethod::Get],
                        operation(&summary, false, false, featured),
                    );
                }
            }
        }
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
        .routes(routes!(
            routes::external::put_account,
            routes::external::get_account,
            routes::external::delete_account
        ))
        .routes(routes!(routes::external::put_user))
        .routes(routes!(routes::external::put_member, routes::external::delete_member))
        .split_for_parts()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/openapi.json` is this document, so the repository's reference cannot drift from
    /// the code. `KEYWARD_UPDATE_DOCS=1 cargo test -p keyward-server --lib openapi` rewrites it.
    #[test]
    fn the_documents_copy_in_docs_is_current() {
        let (_, doc) = api_router();
        let current = format!("{}\n", doc.to_pretty_json().unwrap());
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        #[allow(
            clippy::disallowed_methods,
            reason = "a test's own switch, not keyward configuration"
        )]
        if std::env::var("KEYWARD_UPDATE_DOCS").as_deref() == Ok("1") {
            std::fs::write(&path, &current).unwrap();
        }
        let copy = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            copy == current,
            "docs/openapi.json is not the document keyward serves: run KEYWARD_UPDATE_DOCS=1 cargo test -p keyward-server --lib openapi"
        );
    }

    /// `docs/API.md`, the reference a clone carries, names every route of this document and
    /// every error code (a pass-through route by its path after the SDK's base URL).
    #[test]
    fn the_reference_names_every_route_and_error_code() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/API.md");
        let reference = std::fs::read_to_string(&path).unwrap();
        let (_, doc) = api_router();
        let mut missing = Vec::new();
        for route in doc.paths.paths.keys() {
            let short = match route.split_once("/providers/") {
                Some((_, rest)) => rest
                    .split_once('/')
                    .map_or(rest, |(_, p)| p)
                    .replace("{model_action}", "{model}:generateContent"),
                None => route.replace("{account_id}", "{id}"),
            };
            let short = format!("/{}", short.trim_start_matches('/'));
            // The whole path, not a prefix of a longer one.
            let named = reference.match_indices(&short).any(|(at, _)| {
                reference[at + short.len()..]
                    .chars()
                    .next()
                    .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            });
            if !named {
                missing.push(short);
            }
        }
        for code in keyward_core::ErrorCode::ALL {
            let row = format!("| `{}` | {} |", code.as_str(), code.http_status());
            if !reference.contains(&row) {
                missing.push(row);
            }
        }
        assert!(missing.is_empty(), "docs/API.md does not name: {missing:?}");
    }

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
            ("/v1/external/accounts/{external_id}", &["put", "get", "delete"]),
            ("/v1/external/users/{external_id}", &["put"]),
            (
                "/v1/external/accounts/{external_id}/members/{user_external_id}",
                &["put", "delete"],
            ),
            (
                "/v1/accounts/{account_id}/features/{feature}/providers/anthropic/v1/messages",
                &["post"],
            ),
            ("/healthz", &["get"]),
            ("/readyz", &["get"]),
            ("/v1/accounts/{account_id}/providers/openai/v1/responses", &["post"]),
            (
                "/v1/accounts/{account_id}/providers/google/v1/models/{model_action}",
                &["post"],
            ),
        ] {
            for m in methods {
                assert!(paths[path][m].is_object(), "{m} {path} is not documented");
            }
        }
        assert_eq!(v["servers"][0]["url"], "/");
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
