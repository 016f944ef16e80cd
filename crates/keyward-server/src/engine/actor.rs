//! [`Actor`]: who acts on an account, and what they may do there.

use keyward_core::{AccountId, ErrorCode, Plan};
use keyward_store::{Account, AuditActor, Membership, User};

use crate::error::{ApiError, ApiResult};

/// A user acting in one of their accounts, with their role there: what every engine
/// function is given instead of a request. (Services acting for an account come later.)
#[derive(Debug, Clone)]
pub struct Actor {
    pub user: User,
    pub membership: Membership,
}

impl Actor {
    pub fn account(&self) -> &Account {
        &self.membership.account
    }

    pub fn account_id(&self) -> &AccountId {
        &self.membership.account.id
    }

    /// Who the audit log names.
    pub fn audit_actor(&self) -> AuditActor {
        AuditActor(self.user.id.to_string())
    }

    /// Saving, rotating, removing, testing and switching keys: owners and admins only
    /// (`403 forbidden`, naming `what`).
    pub fn may_manage_keys(&self, what: &str) -> ApiResult<()> {
        if self.membership.role.can_manage_keys() {
            Ok(())
        } else {
            Err(ApiError::forbidden(what))
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
