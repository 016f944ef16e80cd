//! `keyward audit verify` and `keyward audit export`.

use keyward_core::AccountId;
use keyward_crypto::AuditChainKey;
use keyward_store::audit::verify_chain;
use keyward_store::{ChainBreak, Store};
use serde_json::{json, Value};

use crate::engine::audit::event_json;
use crate::runtime::RuntimeError;

/// The outcome of verifying one or all accounts' chains.
#[derive(Debug)]
pub enum Verdict {
    Intact { accounts: usize, events: usize },
    Broken(ChainBreak),
}

impl Verdict {
    pub fn to_json(&self) -> Value {
        match self {
            Verdict::Intact { accounts, events } => json!({ "ok": true, "accounts": accounts, "events": events }),
            Verdict::Broken(b) => {
                json!({ "ok": false, "account_id": b.account_id, "event_id": b.event_id, "seq": b.seq, "reason": b.reason })
            }
        }
    }
}

pub async fn verify(store: &dyn Store, key: &AuditChainKey, account: Option<&str>) -> Result<Verdict, RuntimeError> {
    let accounts =
        match account {
            Some(a) => vec![AccountId::parse(a)
                .map_err(|_| RuntimeError::Other("--account: expected an account id (acc_…)".into()))?],
            // Deleted accounts keep their chains: those are verified too.
            None => store.chain_account_ids().await?,
        };
    let mut total = 0;
    for account in &accounts {
        let (events, head) = store.audit_chain(account).await?;
        match verify_chain(key, account.as_str(), &events, head.as_ref()) {
            Ok(n) => total += n,
            Err(b) => return Ok(Verdict::Broken(b)),
        }
    }
    Ok(Verdict::Intact {
        accounts: accounts.len(),
        events: total,
    })
}

/// Every event of an account, oldest first, as JSON lines with `seq` and `mac` (hex). A
/// deleted account's chain (ending in `account.deleted`) is exported as well.
pub async fn export(store: &dyn Store, account: &str) -> Result<Vec<String>, RuntimeError> {
    let account = AccountId::parse(account)
        .map_err(|_| RuntimeError::Other("--account: expected an account id (acc_…)".into()))?;
    let (events, head) = store.audit_chain(&account).await?;
    if events.is_empty() && head.is_none() && store.account(&account).await?.is_none() {
        return Err(RuntimeError::Other(format!("no account {account}")));
    }
    Ok(events
        .iter()
        .map(|e| {
            let mut v = event_json(e);
            if let Some(obj) = v.as_object_mut() {
                obj.insert("account_id".into(), json!(e.account_id));
                obj.insert("seq".into(), json!(e.seq));
                obj.insert("mac".into(), json!(hex::encode(&e.mac)));
            }
            v.to_string()
        })
        .collect())
}
