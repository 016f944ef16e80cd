//! Who is calling: the request extractors that turn a bearer token into a user or one of the
//! product's services ([`Caller`]), or an [`Actor`] in the path's account
//! ([`AccountMemberClaim`]). The checks themselves are the engine's
//! ([`crate::engine::identity`], [`crate::engine::actor`]).

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use keyward_core::{Provider, Scope};
use keyward_store::{CallKey, Service, User};
use zeroize::Zeroizing;

use crate::engine::actor::{Access, Principal};
use crate::engine::identity::well_formed_token_hash;
use crate::engine::Actor;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// An authenticated user or service (from `Authorization: Bearer kw_…` or `kws_…`).
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Caller> {
        let principal = state.engine.principal_by_token(bearer_token(parts)?).await?;
        Ok(Caller { principal })
    }
}

impl Caller {
    /// The caller acting in `account` for `access`: a user who is not a member gets 404
    /// (never 403); a service outside its scopes 403, then 404 for an unknown account.
    pub async fn in_account(&self, state: &AppState, account: &str, access: Access) -> ApiResult<Actor> {
        state.engine.principal_actor(&self.principal, account, access).await
    }

    /// A user's token only (a service: `403 scope_required`).
    pub fn user(&self) -> ApiResult<&User> {
        self.principal.user()
    }

    /// A service token holding `scope` only (else `403 scope_required`).
    pub fn service_with(&self, scope: Scope) -> ApiResult<&Service> {
        self.principal.service_with(scope)
    }
}

/// The token of an `Authorization: Bearer …` header, or 401.
fn bearer_token(parts: &Parts) -> ApiResult<&str> {
    parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(ApiError::unauthorized)
}

/// A request's bearer token and `{account_id}`, not yet checked beyond the token's shape
/// (401 without a lookup): for a route that reads something else while the membership is
/// checked ([`AccountMemberClaim::check`]). `Debug` shows the account only.
pub struct AccountMemberClaim {
    token: Zeroizing<String>,
    account: String,
}

impl std::fmt::Debug for AccountMemberClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountMemberClaim")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl FromRequestParts<AppState> for AccountMemberClaim {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<AccountMemberClaim> {
        // Owned (and wiped on drop): reading the path parameters needs `parts` mutably.
        let token = Zeroizing::new(bearer_token(parts)?.to_owned());
        well_formed_token_hash(&token)?;
        let params = axum::extract::RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::not_found())?;
        let account = params
            .iter()
            .find(|(k, _)| *k == "account_id")
            .map(|(_, v)| v.to_owned())
            .ok_or_else(ApiError::not_found)?;
        Ok(AccountMemberClaim { token, account })
    }
}

impl AccountMemberClaim {
    /// The `{account_id}` as the path gave it (unchecked).
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The caller acting in the account for an AI call: 401, then 403 (a service without
    /// `ai:call`), then 404.
    pub async fn check(&self, state: &AppState) -> ApiResult<Actor> {
        state
            .engine
            .actor_by_token(&self.token, &self.account, Access::Call)
            .await
    }

    /// [`AccountMemberClaim::check`] and the account's key for `provider`, with one read.
    pub async fn check_with_key(&self, state: &AppState, provider: Provider) -> ApiResult<(Actor, CallKey)> {
        state
            .engine
            .actor_and_call_key(&self.token, &self.account, provider)
            .await
    }
}
