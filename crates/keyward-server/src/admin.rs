//! Administrative operations behind `keyward admin …` and the first start of `serve`.
//! Each returns the JSON the CLI prints. The platform's actions among them (a shared-pool
//! key, a plan change) are also appended to the platform's audit chain, actor `cli`.

use keyward_core::{AccountId, Email, Plan, Role, Scope, ServiceId, ServiceName, UserId};
use keyward_store::{NewPlatformEvent, PlatformAction, Store};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::clock::Clock;
use crate::engine::identity::{new_service_token, new_token, random_id_bytes};
use crate::runtime::RuntimeError;

fn bad(what: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Other(what.to_string())
}

/// Creates a user with a fresh token. The token is returned once and only its hash kept.
pub async fn create_user(
    store: &dyn Store,
    clock: &dyn Clock,
    email: &str,
) -> Result<(UserId, Zeroizing<String>), RuntimeError> {
    let email = Email::parse(email).map_err(|e| bad(format!("--email: {e}")))?;
    let id = UserId::from_random(random_id_bytes());
    let (token, hash) = new_token();
    store.create_user(&id, &email, &hash, clock.now()).await?;
    Ok((id, token))
}

pub async fn create_account(
    store: &dyn Store,
    clock: &dyn Clock,
    name: &str,
    plan: &str,
    owner: &str,
) -> Result<AccountId, RuntimeError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(bad("--name: expected 1 to 200 printable characters"));
    }
    let plan: Plan = plan.parse().map_err(|e| bad(format!("--plan: {e}")))?;
    let owner = user_by_email(store, owner).await?;
    let id = AccountId::from_random(random_id_bytes());
    store.create_account(&id, name, plan, &owner, clock.now()).await?;
    Ok(id)
}

async fn user_by_email(store: &dyn Store, email: &str) -> Result<UserId, RuntimeError> {
    let email = Email::parse(email).map_err(|e| bad(format!("--email: {e}")))?;
    let user = store
        .user_by_email(&email)
        .await?
        .ok_or_else(|| bad(format!("no user with email {email}")))?;
    Ok(user.id)
}

fn account_id(raw: &str) -> Result<AccountId, RuntimeError> {
    AccountId::parse(raw).map_err(|_| bad("--account: expected an account id (acc_…)"))
}

pub async fn add_member(
    store: &dyn Store,
    clock: &dyn Clock,
    account: &str,
    email: &str,
    role: &str,
) -> Result<Value, RuntimeError> {
    let account = account_id(account)?;
    let role: Role = role.parse().map_err(|e| bad(format!("--role: {e}")))?;
    store
        .account(&account)
        .await?
        .ok_or_else(|| bad(format!("no account {account}")))?;
    let user = user_by_email(store, email).await?;
    store.set_membership(&account, &user, role, clock.now()).await?;
    Ok(json!({ "account_id": account, "user_id": user, "role": role }))
}

/// Who the audit log names for the admin CLI's changes.
pub fn cli_actor() -> keyward_store::AuditActor {
    keyward_store::AuditActor("cli".to_owned())
}

/// Appends a platform action the CLI has just made to the platform's audit chain. The
/// action is already done when this runs (a KEK file, a shared key): if the append fails,
/// the command fails saying so, for the operator to record it by other means.
pub async fn audit_platform(store: &dyn Store, event: &NewPlatformEvent) -> Result<(), RuntimeError> {
    store.append_platform_audit(event).await.map_err(|e| {
        bad(format!(
            "{} was done, but could not be written to the platform's audit chain: {e}",
            event.action.as_str()
        ))
    })
}

/// Changes the plan (and optionally the limit); audited as `account.plan_changed`, actor
/// `cli`, when something changed.
pub async fn set_plan(
    store: &dyn Store,
    clock: &dyn Clock,
    account: &str,
    plan: &str,
    limit: Option<i64>,
) -> Result<Value, RuntimeError> {
    let account = account_id(account)?;
    let plan: Plan = plan.parse().map_err(|e| bad(format!("--plan: {e}")))?;
    if limit.is_some_and(|n| n < 0) {
        return Err(bad("--shared-credit-limit: must be 0 or more"));
    }
    let before = store.account(&account).await?;
    let now = clock.now();
    let changed = store
        .set_plan(&account, plan, limit, &cli_actor(), now)
        .await
        .map_err(|e| match e {
            keyward_store::StoreError::NotFound => bad(format!("no account {account}")),
            other => other.into(),
        })?;
    let after = store
        .account(&account)
        .await?
        .ok_or_else(|| bad(format!("no account {account}")))?;
    if changed {
        let mut event = NewPlatformEvent::new(now, &cli_actor(), PlatformAction::PlanChanged);
        event.account_id = Some(account.clone());
        event.detail = before.map(|b| {
            format!(
                "{} -> {}; shared_credit_limit {} -> {}",
                b.plan, after.plan, b.shared_credit_limit, after.shared_credit_limit
            )
        });
        audit_platform(store, &event).await?;
    }
    Ok(json!({ "account_id": account, "plan": after.plan, "shared_credit_limit": after.shared_credit_limit }))
}

/// Creates one of the product's services with `scopes` and a fresh `kws_` token, returned
/// once (only its hash is kept). Scopes are exactly `ai:call`, `accounts:manage`,
/// `audit:read`; at least one.
pub async fn create_service(
    store: &dyn Store,
    clock: &dyn Clock,
    name: &str,
    scopes: &[String],
) -> Result<(ServiceId, Zeroizing<String>), RuntimeError> {
    let name = ServiceName::parse(name).map_err(|e| bad(format!("--name: {e}")))?;
    if scopes.is_empty() {
        return Err(bad(
            "--scope: give at least one of ai:call, accounts:manage, audit:read",
        ));
    }
    let scopes = scopes
        .iter()
        .map(|s| s.parse::<Scope>().map_err(|e| bad(format!("--scope {s:?}: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let id = ServiceId::from_random(random_id_bytes());
    let (token, hash) = new_service_token();
    store
        .create_service(&id, name.as_str(), &scopes, &hash, clock.now())
        .await?;
    Ok((id, token))
}

fn service_json(s: &keyward_store::Service) -> Value {
    json!({
        "service_id": s.id,
        "name": s.name,
        "scopes": s.scopes,
        "created_at": s.created_at.rfc3339(),
        "revoked_at": s.revoked_at.map(|t| t.rfc3339()),
    })
}

/// Every service (never a token), revoked ones with `revoked_at`.
pub async fn list_services(store: &dyn Store) -> Result<Value, RuntimeError> {
    let services = store.services().await?;
    Ok(json!({ "services": services.iter().map(service_json).collect::<Vec<_>>() }))
}

/// Revokes the live service named `name`: its token is refused from the next request on,
/// on every node (tokens are looked up on every request).
pub async fn revoke_service(store: &dyn Store, clock: &dyn Clock, name: &str) -> Result<Value, RuntimeError> {
    let name = ServiceName::parse(name).map_err(|e| bad(format!("--name: {e}")))?;
    let revoked = store
        .revoke_service(name.as_str(), clock.now())
        .await?
        .ok_or_else(|| bad(format!("no live service named {name}")))?;
    Ok(service_json(&revoked))
}

/// What the first start of `serve` created.
#[derive(Debug)]
pub struct FirstStart {
    pub user_id: UserId,
    pub token: Zeroizing<String>,
    pub account_id: AccountId,
}

pub const FIRST_OWNER_EMAIL: &str = "owner@localhost";

/// On an empty database: the owner user and a `Personal` account on plan pro.
pub async fn first_start(store: &dyn Store, clock: &dyn Clock) -> Result<Option<FirstStart>, RuntimeError> {
    if store.count_users().await? > 0 {
        return Ok(None);
    }
    let (user_id, token) = create_user(store, clock, FIRST_OWNER_EMAIL).await?;
    let account_id = create_account(store, clock, "Personal", "pro", FIRST_OWNER_EMAIL).await?;
    Ok(Some(FirstStart {
        user_id,
        token,
        account_id,
    }))
}

/// Seals and stores the platform's shared-pool key for `provider` (read from stdin by the
/// CLI, never from argv). The key is checked like any account key.
pub async fn set_shared_key(
    store: &dyn Store,
    sealer: &keyward_crypto::KekSealer,
    clock: &dyn Clock,
    provider: &str,
    raw: &str,
) -> Result<Value, RuntimeError> {
    let provider: keyward_core::Provider = provider.parse().map_err(|e| bad(format!("--provider: {e}")))?;
    let key = keyward_core::ApiKey::parse(provider, raw).map_err(|e| bad(format!("the key on standard input: {e}")))?;
    let key_id = keyward_core::KeyId::from_random(random_id_bytes());
    let binding = keyward_crypto::Binding {
        account_id: keyward_core::KeyOwner::SHARED_POOL,
        provider: provider.as_str(),
        key_id: key_id.as_str(),
    };
    let sealed = sealer
        .seal(&binding, key.expose_secret().as_bytes())
        .await
        .map_err(bad)?;
    let last4 = key.last4().clone();
    let kind = key.kind();
    let now = clock.now();
    let rotated = store
        .save_shared_key(
            provider,
            keyward_store::NewKey {
                key_id,
                sealed,
                last4: last4.clone(),
                kind,
            },
            now,
        )
        .await?;
    let action = if rotated {
        PlatformAction::SharedKeyRotated
    } else {
        PlatformAction::SharedKeySaved
    };
    let mut event = NewPlatformEvent::new(now, &cli_actor(), action);
    event.provider = Some(provider);
    event.key_last4 = Some(last4.clone());
    audit_platform(store, &event).await?;
    if rotated {
        // As for account keys: the old ciphertext goes from the database files now.
        store.purge_removed().await?;
    }
    let mut out = json!({ "provider": provider, "last4": last4, "rotated": rotated, "kind": kind });
    if let Some(notice) = kind.notice() {
        out["notice"] = json!(notice);
    }
    Ok(out)
}
