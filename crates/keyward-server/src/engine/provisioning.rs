//! The provisioning API's work (`/v1/external/…`, scope `accounts:manage`): accounts,
//! users and memberships keyed by the product's own ids, every call idempotent so the
//! product can replay it after a failure.
//!
//! Every input is checked before anything is written (external ids, name, plan, limit,
//! email, role: `422 validation_error`), so nothing is half-written. A plan change takes
//! effect with the next call (the account is read on every call) and is audited
//! (`account.plan_changed`, actor `service:<name>`) in the transaction that makes it;
//! deleting an account removes its keys as Remove does (each audited `key.removed`, the
//! ciphertext purged from the database files within seconds) and closes its chain with
//! `account.deleted`.

use keyward_core::{AccountId, Email, ErrorCode, ExternalId, Plan, Role, UserId};
use keyward_store::{AccountSpec, ExternalAccount, ExternalUser, Service, StoreError};

use super::actor::service_audit_actor;
use super::identity::random_id_bytes;
use super::Engine;
use crate::error::{ApiError, ApiResult};

/// The product's id of an account or user, from a path: `422 validation_error` unless it is
/// 1 to 128 characters of `[A-Za-z0-9._:-]`.
pub fn parse_external_id(what: &str, raw: &str) -> ApiResult<ExternalId> {
    ExternalId::parse(raw).map_err(|e| ApiError::validation(format!("{what}: {e}")))
}

/// An account's name: trimmed, 1 to 200 characters, none a control character.
pub fn parse_account_name(raw: &str) -> ApiResult<String> {
    let name = raw.trim();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::validation("name must be 1 to 200 printable characters"));
    }
    Ok(name.to_owned())
}

pub fn parse_plan(raw: &str) -> ApiResult<Plan> {
    raw.parse()
        .map_err(|_| ApiError::validation("plan must be \"free\", \"pro\" or \"business\""))
}

pub fn parse_role(raw: &str) -> ApiResult<Role> {
    raw.parse()
        .map_err(|_| ApiError::validation("role must be \"owner\", \"admin\" or \"member\""))
}

pub fn parse_email(raw: &str) -> ApiResult<Email> {
    Email::parse(raw).map_err(|e| ApiError::validation(format!("email: {e}")))
}

/// What `PUT /v1/external/accounts/{external_id}` sets.
#[derive(Debug, Clone)]
pub struct AccountRequest {
    pub name: String,
    pub plan: String,
    /// `None`: the plan's default.
    pub shared_credit_limit: Option<i64>,
}

impl AccountRequest {
    fn check(&self) -> ApiResult<AccountSpec> {
        let name = parse_account_name(&self.name)?;
        let plan = parse_plan(&self.plan)?;
        if self.shared_credit_limit.is_some_and(|n| n < 0) {
            return Err(ApiError::validation("shared_credit_limit must be 0 or more"));
        }
        Ok(AccountSpec {
            name,
            plan,
            shared_credit_limit: self.shared_credit_limit,
        })
    }
}

/// A membership made through the provisioning API.
#[derive(Debug, Clone)]
pub struct ExternalMember {
    pub account: ExternalAccount,
    pub user: ExternalUser,
    pub role: Role,
}

impl Engine {
    /// Creates the account the product knows as `external` (no member yet) or sets its name,
    /// plan and limit. Idempotent; concurrent calls for one new id make one account.
    pub async fn put_external_account(
        &self,
        service: &Service,
        external: &str,
        request: &AccountRequest,
    ) -> ApiResult<ExternalAccount> {
        let external = parse_external_id("external_id", external)?;
        let spec = request.check()?;
        let new_id = AccountId::from_random(random_id_bytes());
        let put = self
            .store
            .put_external_account(
                &external,
                &new_id,
                &spec,
                &service_audit_actor(service),
                self.clock.now(),
            )
            .await?;
        let account = &put.account.account;
        if put.created {
            tracing::info!(account = %account.id, %external, service = %service.name, "account provisioned");
        } else if put.plan_changed {
            tracing::info!(account = %account.id, plan = %account.plan, service = %service.name, "plan changed");
        }
        Ok(put.account)
    }

    /// The account the product knows as `external`, or 404.
    pub async fn external_account(&self, external: &str) -> ApiResult<ExternalAccount> {
        let external = parse_external_id("external_id", external)?;
        self.store
            .account_by_external_id(&external)
            .await?
            .ok_or_else(ApiError::not_found)
    }

    /// Deletes the account the product knows as `external`: its keys removed as Remove does
    /// (audited, purged), its chain closed with `account.deleted` and kept, its members,
    /// sources and counters gone. 404 when there is no such account (a replay after success).
    pub async fn delete_external_account(&self, service: &Service, external: &str) -> ApiResult<()> {
        let found = self.external_account(external).await?;
        let id = found.account.id;
        let detail = format!("external id {}", found.external_id);
        let removed = self
            .store
            .delete_account(&id, &service_audit_actor(service), Some(detail), self.clock.now())
            .await?;
        // The removed ciphertext leaves the database files within seconds, as after Remove.
        self.purge.request();
        tracing::info!(account = %id, keys_removed = removed, service = %service.name, "account deleted");
        Ok(())
    }

    /// Creates the user the product knows as `external` (with no token: they act through the
    /// product's services, or get one from an operator) or sets their email. Another user
    /// with that email: `409 conflict`.
    pub async fn put_external_user(&self, external: &str, email: &str) -> ApiResult<ExternalUser> {
        let external = parse_external_id("external_id", external)?;
        let email = parse_email(email)?;
        let new_id = UserId::from_random(random_id_bytes());
        match self
            .store
            .put_external_user(&external, &new_id, &email, self.clock.now())
            .await
        {
            Ok(user) => Ok(user),
            Err(StoreError::Conflict(message)) => {
                // A concurrent identical call may have made this very user: that is a replay.
                match self.store.user_by_external_id(&external).await? {
                    Some(user) if user.user.email == email => Ok(user),
                    _ => Err(ApiError::new(ErrorCode::Conflict, message)),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn external_pair(&self, account: &str, user: &str) -> ApiResult<(ExternalAccount, ExternalUser)> {
        let account = self.external_account(account).await?;
        let user = parse_external_id("user external_id", user)?;
        let user = self
            .store
            .user_by_external_id(&user)
            .await?
            .ok_or_else(ApiError::not_found)?;
        Ok((account, user))
    }

    /// Makes the user a member of the account with `role` (or changes their role). Unknown
    /// account or user: 404.
    pub async fn put_external_member(&self, account: &str, user: &str, role: &str) -> ApiResult<ExternalMember> {
        parse_external_id("account external_id", account)?;
        parse_external_id("user external_id", user)?;
        let role = parse_role(role)?;
        let (account, user) = self.external_pair(account, user).await?;
        self.store
            .set_membership(&account.account.id, &user.user.id, role, self.clock.now())
            .await?;
        Ok(ExternalMember { account, user, role })
    }

    /// Ends the user's membership of the account (nothing to do when there is none). Unknown
    /// account or user: 404.
    pub async fn delete_external_member(&self, account: &str, user: &str) -> ApiResult<()> {
        parse_external_id("account external_id", account)?;
        parse_external_id("user external_id", user)?;
        let (account, user) = self.external_pair(account, user).await?;
        self.store.remove_membership(&account.account.id, &user.user.id).await?;
        Ok(())
    }
}
