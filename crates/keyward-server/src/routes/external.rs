//! The provisioning API: `/v1/external/…`, keyed by the product's own ids, for a service
//! token with the `accounts:manage` scope ([`crate::engine::provisioning`]). Every call is
//! idempotent.
//!
//! Checks run in a fixed order: token (401), scope (403 `scope_required`; a user's token too),
//! external ids in the path (422), body (413/415/400/422), then what the ids name (404).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use keyward_core::Scope;
use keyward_store::{ExternalAccount, ExternalUser};

use crate::api::{
    ErrorBody, ExternalAccountBody, ExternalAccountRequest, ExternalMemberBody, ExternalMemberRequest,
    ExternalUserBody, ExternalUserRequest,
};
use crate::auth::Caller;
use crate::engine::provisioning::{parse_external_id, AccountRequest};
use crate::error::ApiResult;
use crate::extract::JsonBody;
use crate::state::AppState;

fn account_body(a: &ExternalAccount) -> ExternalAccountBody {
    ExternalAccountBody {
        account_id: a.account.id.to_string(),
        external_id: a.external_id.to_string(),
        name: a.account.name.clone(),
        plan: a.account.plan.as_str().to_owned(),
        shared_credit_limit: a.account.shared_credit_limit,
    }
}

fn user_body(u: &ExternalUser) -> ExternalUserBody {
    ExternalUserBody {
        user_id: u.user.id.to_string(),
        external_id: u.external_id.to_string(),
        email: u.user.email.to_string(),
    }
}

#[utoipa::path(
    put,
    path = "/v1/external/accounts/{external_id}",
    tag = "provisioning",
    params(("external_id" = String, Path, description = "The product's account id: 1 to 128 of A-Z a-z 0-9 . _ : -")),
    request_body = ExternalAccountRequest,
    responses(
        (status = 200, description = "Created or updated (idempotent); a plan change takes effect at once and is audited", body = ExternalAccountBody),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Not a service token with the accounts:manage scope", body = ErrorBody),
        (status = 404, description = "No such route (an empty external id)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "Bad external id, unknown field, bad name, unknown plan, negative limit", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn put_account(
    State(state): State<AppState>,
    caller: Caller,
    Path(external_id): Path<String>,
    body: JsonBody,
) -> ApiResult<Json<ExternalAccountBody>> {
    let service = caller.service_with(Scope::AccountsManage)?;
    parse_external_id("external_id", &external_id)?;
    let body: ExternalAccountRequest = body.parse()?;
    let request = AccountRequest {
        name: body.name,
        plan: body.plan,
        shared_credit_limit: body.shared_credit_limit,
    };
    let account = state
        .engine
        .put_external_account(service, &external_id, &request)
        .await?;
    Ok(Json(account_body(&account)))
}

#[utoipa::path(
    get,
    path = "/v1/external/accounts/{external_id}",
    tag = "provisioning",
    params(("external_id" = String, Path, description = "The product's account id")),
    responses(
        (status = 200, description = "The account, as the PUT answered", body = ExternalAccountBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Not a service token with the accounts:manage scope", body = ErrorBody),
        (status = 404, description = "No account has this external id", body = ErrorBody),
        (status = 422, description = "Bad external id", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_account(
    State(state): State<AppState>,
    caller: Caller,
    Path(external_id): Path<String>,
) -> ApiResult<Json<ExternalAccountBody>> {
    caller.service_with(Scope::AccountsManage)?;
    let account = state.engine.external_account(&external_id).await?;
    Ok(Json(account_body(&account)))
}

#[utoipa::path(
    delete,
    path = "/v1/external/accounts/{external_id}",
    tag = "provisioning",
    params(("external_id" = String, Path, description = "The product's account id")),
    responses(
        (status = 204, description = "Deleted: every saved key removed as Remove does (audited key.removed, purged within seconds), the audit chain closed with account.deleted and kept"),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Not a service token with the accounts:manage scope", body = ErrorBody),
        (status = 404, description = "No account has this external id (also a replay after a delete)", body = ErrorBody),
        (status = 422, description = "Bad external id", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_account(
    State(state): State<AppState>,
    caller: Caller,
    Path(external_id): Path<String>,
) -> ApiResult<StatusCode> {
    let service = caller.service_with(Scope::AccountsManage)?;
    state.engine.delete_external_account(service, &external_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    put,
    path = "/v1/external/users/{external_id}",
    tag = "provisioning",
    params(("external_id" = String, Path, description = "The product's user id: 1 to 128 of A-Z a-z 0-9 . _ : -")),
    request_body = ExternalUserRequest,
    responses(
        (status = 200, description = "Created or updated (idempotent)", body = ExternalUserBody),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Not a service token with the accounts:manage scope", body = ErrorBody),
        (status = 404, description = "No such route (an empty external id)", body = ErrorBody),
        (status = 409, description = "Another user has this email", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "Bad external id, unknown field, bad email", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn put_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(external_id): Path<String>,
    body: JsonBody,
) -> ApiResult<Json<ExternalUserBody>> {
    caller.service_with(Scope::AccountsManage)?;
    parse_external_id("external_id", &external_id)?;
    let body: ExternalUserRequest = body.parse()?;
    let user = state.engine.put_external_user(&external_id, &body.email).await?;
    Ok(Json(user_body(&user)))
}

#[utoipa::path(
    put,
    path = "/v1/external/accounts/{external_id}/members/{user_external_id}",
    tag = "provisioning",
    params(
        ("external_id" = String, Path, description = "The product's account id"),
        ("user_external_id" = String, Path, description = "The product's user id"),
    ),
    request_body = ExternalMemberRequest,
    responses(
        (status = 200, description = "The user is a member with this role (idempotent)", body = ExternalMemberBody),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Not a service token with the accounts:manage scope", body = ErrorBody),
        (status = 404, description = "No such account or user", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "Bad external id, unknown field, bad role", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn put_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((account, user)): Path<(String, String)>,
    body: JsonBody,
) -> ApiResult<Json<ExternalMemberBody>> {
    caller.service_with(Scope::AccountsManage)?;
    parse_external_id("external_id", &account)?;
    parse_external_id("user_external_id", &user)?;
    let body: ExternalMemberRequest = body.parse()?;
    let m = state.engine.put_external_member(&account, &user, &body.role).await?;
    Ok(Json(ExternalMemberBody {
        account_id: m.account.account.id.to_string(),
        external_account_id: m.account.external_id.to_string(),
        user_id: m.user.user.id.to_string(),
        external_user_id: m.user.external_id.to_string(),
        role: m.role.as_str().to_owned(),
    }))
}

#[utoipa::path(
    delete,
    path = "/v1/external/accounts/{external_id}/members/{user_external_id}",
    tag = "provisioning",
    params(
        ("external_id" = String, Path, description = "The product's account id"),
        ("user_external_id" = String, Path, description = "The product's user id"),
    ),
    responses(
        (status = 204, description = "The user is not a member (any more; idempotent)"),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "Not a service token with the accounts:manage scope", body = ErrorBody),
        (status = 404, description = "No such account or user", body = ErrorBody),
        (status = 422, description = "Bad external id", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((account, user)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    caller.service_with(Scope::AccountsManage)?;
    state.engine.delete_external_member(&account, &user).await?;
    Ok(StatusCode::NO_CONTENT)
}
