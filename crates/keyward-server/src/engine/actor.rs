//! [`Actor`]: who acts on an account, and what they may do there.
//!
//! Two kinds of caller act on accounts: a user, in an account they are a member of (their
//! role says what they may do), and one of the product's services, in any account (its
//! token's scopes say what it may do; no scope manages keys). [`Access`] names what a route
//! does, so both kinds are judged by one rule ([`Principal::may`]).

use keyward_core::{AccountId, ErrorCode, Plan, Role, Scope, UserId};
use keyward_store::{Account, AuditActor, Membership, Service, User};

use crate::error::{ApiError, ApiResult};

/// Who a token belongs to.
#[derive(Debug, Clone)]
pub enum Principal {
    User(User),
    Service(Service),
}

/// What a route does to an account, as far as who may do it is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// An AI call (`ai/messages`, the native pass-through): scope `ai:call`.
    Call,
    /// The account's audit log: scope `audit:read`.
    ReadAudit,
    /// Saving, rotating, removing, testing and switching keys: owners and admins only; no
    /// service, whatever its scopes (`403 forbidden`).
    ManageKeys,
    /// The rest of an account's routes (key listing, usage): members only; no scope covers
    /// them (`403 scope_required`).
    ReadAccount,
}

impl Access {
    /// The scope a service needs, `None` when no scope allows it.
    pub fn scope(self) -> Option<Scope> {
        match self {
            Access::Call => Some(Scope::AiCall),
            Access::ReadAudit => Some(Scope::AuditRead),
            Access::ManageKeys | Access::ReadAccount => None,
        }
    }
}

/// `403 scope_required`, naming what the route needs and what the service has.
pub fn scope_required(service: &Service, needed: Option<Scope>) -> ApiError {
    let has = if service.scopes.is_empty() {
        "none".to_owned()
    } else {
        service.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
    };
    let message = match needed {
        Some(scope) => format!(
            "this route needs the {scope} scope; service {} has: {has}",
            service.name
        ),
        None => format!(
            "no service scope covers this route (service {} has: {has}); it is for an account's users",
            service.name
        ),
    };
    ApiError::new(ErrorCode::ScopeRequired, message)
}

/// `403 scope_required` for a user's token on a route only services may call.
pub fn service_only(scope: Scope) -> ApiError {
    ApiError::new(
        ErrorCode::ScopeRequired,
        format!("this route is for the product's services: a service token (kws_…) with the {scope} scope"),
    )
}

/// No service manages keys: `403 forbidden`.
pub fn services_never_manage_keys(what: &str) -> ApiError {
    ApiError::new(
        ErrorCode::Forbidden,
        format!(
            "{what} is not open to services, whatever their scopes: it needs the owner or admin role in this account"
        ),
    )
}

impl Principal {
    /// A service may do `access` (scope or key management checked); users are judged per
    /// account (membership and role), so this passes them.
    pub fn may(&self, access: Access) -> ApiResult<()> {
        let Principal::Service(service) = self else {
            return Ok(());
        };
        match access {
            Access::ManageKeys => Err(services_never_manage_keys("managing keys")),
            other => match other.scope() {
                Some(scope) if service.has(scope) => Ok(()),
                needed => Err(scope_required(service, needed)),
            },
        }
    }

    /// The user behind a user's token; a service gets `403 scope_required`.
    pub fn user(&self) -> ApiResult<&User> {
        match self {
            Principal::User(u) => Ok(u),
            Principal::Service(s) => Err(scope_required(s, None)),
        }
    }

    /// The service behind a service token holding `scope`; else `403 scope_required`.
    pub fn service_with(&self, scope: Scope) -> ApiResult<&Service> {
        match self {
            Principal::Service(s) if s.has(scope) => Ok(s),
            Principal::Service(s) => Err(scope_required(s, Some(scope))),
            Principal::User(_) => Err(service_only(scope)),
        }
    }
}

/// Who the audit log names for a service: `service:<name>`.
pub fn service_audit_actor(service: &Service) -> AuditActor {
    AuditActor(format!("service:{}", service.name))
}

/// Who acts in an account.
#[derive(Debug, Clone)]
pub enum Who {
    /// A member, with their role there.
    Member { user: User, role: Role },
    /// One of the product's services (any account, within its scopes).
    Service(Service),
}

/// Someone acting in one account: what every engine function is given instead of a request.
#[derive(Debug, Clone)]
pub struct Actor {
    pub who: Who,
    pub account: Account,
    /// The member a service said it acts for (`keyward-on-behalf-of`), checked to be a
    /// member of the account.
    pub on_behalf_of: Option<UserId>,
}

impl Actor {
    /// A user acting in an account they are a member of.
    pub fn member(user: User, membership: Membership) -> Actor {
        Actor {
            who: Who::Member {
                user,
                role: membership.role,
            },
            account: membership.account,
            on_behalf_of: None,
        }
    }

    /// A service acting in `account`.
    pub fn service(service: Service, account: Account) -> Actor {
        Actor {
            who: Who::Service(service),
            account,
            on_behalf_of: None,
        }
    }

    pub fn account(&self) -> &Account {
        &self.account
    }

    pub fn account_id(&self) -> &AccountId {
        &self.account.id
    }

    /// The member's membership (`None` for a service).
    pub fn membership(&self) -> Option<Membership> {
        match &self.who {
            Who::Member { role, .. } => Some(Membership {
                account: self.account.clone(),
                role: *role,
            }),
            Who::Service(_) => None,
        }
    }

    /// Who the audit log names: the user's id, or `service:<name>`.
    pub fn audit_actor(&self) -> AuditActor {
        match &self.who {
            Who::Member { user, .. } => AuditActor(user.id.to_string()),
            Who::Service(s) => service_audit_actor(s),
        }
    }

    /// Saving, rotating, removing, testing and switching keys: owners and admins only
    /// (`403 forbidden`, naming `what`); never a service.
    pub fn may_manage_keys(&self, what: &str) -> ApiResult<()> {
        match &self.who {
            Who::Member { role, .. } if role.can_manage_keys() => Ok(()),
            Who::Member { .. } => Err(ApiError::forbidden(what)),
            Who::Service(_) => Err(services_never_manage_keys(what)),
        }
    }

    /// Own keys need a paid plan: else `403 plan_required`.
    pub fn may_own_keys(&self) -> ApiResult<()> {
        let plan = self.account().plan;
        if plan == Plan::Free {
            return Err(ApiError::new(
                ErrorCode::PlanRequired,
                format!(
                    "saving your own key needs a paid plan ({} or business); this account is on {plan}",
                    Plan::FIRST_PAID,
                ),
            ));
        }
        Ok(())
    }
}
