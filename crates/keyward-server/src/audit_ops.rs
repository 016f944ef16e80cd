//! `keyward audit verify`, `export` and `checkpoint`.
//!
//! A checkpoint is the head (seq and MAC) of every chain at one time: each account's, the
//! deleted accounts' included (their chains are kept, closed by `account.deleted`), and the
//! platform's. It is signed with Ed25519 under a key kept outside the database
//! ([`CheckpointSigningKey`]). `verify --checkpoint` first checks the signature against that
//! key, then verifies every chain as plain `verify` does, then checks that each chain of the
//! checkpoint still reaches the checkpoint's seq with the same MAC: a chain rolled back
//! behind it (events deleted and the head set back to an older, consistent link, which the
//! chain alone cannot tell from one that never grew), or deleted whole, is named.

use keyward_core::{AccountId, UnixMillis};
use keyward_crypto::{verify_checkpoint_signature, AuditChainKey, CheckpointSigningKey};
use keyward_store::audit::{verify_chain, verify_platform_chain, ChainHead};
use keyward_store::{ChainBreak, PlatformEvent, Store, PLATFORM_CHAIN};
use serde_json::{json, Value};

use crate::engine::audit::event_json;
use crate::runtime::RuntimeError;

/// The label a checkpoint's signed bytes start with, and its `format` field.
pub const CHECKPOINT_FORMAT: &str = "keyward-audit-checkpoint-v1";

/// The outcome of verifying one or all accounts' chains (and the platform's).
#[derive(Debug)]
pub enum Verdict {
    Intact {
        accounts: usize,
        events: usize,
        /// Events on the platform's chain (`None` when only one account was verified).
        platform_events: Option<usize>,
        /// Chains checked against a checkpoint (`None` without one).
        checkpoint_chains: Option<usize>,
    },
    Broken(ChainBreak),
    /// The chains verify, but these are behind the checkpoint (rolled back or deleted).
    BehindCheckpoint(Vec<ChainBreak>),
    /// The checkpoint file is not one this key signed (or not a checkpoint at all).
    CheckpointRefused(String),
}

fn break_json(b: &ChainBreak) -> Value {
    json!({ "account_id": b.account_id, "chain": b.account_id, "event_id": b.event_id, "seq": b.seq, "reason": b.reason })
}

impl Verdict {
    pub fn to_json(&self) -> Value {
        match self {
            Verdict::Intact {
                accounts,
                events,
                platform_events,
                checkpoint_chains,
            } => {
                let mut v = json!({ "ok": true, "accounts": accounts, "events": events });
                if let Some(n) = platform_events {
                    v["platform_events"] = json!(n);
                }
                if let Some(n) = checkpoint_chains {
                    v["checkpoint_chains"] = json!(n);
                }
                v
            }
            Verdict::Broken(b) => {
                let mut v = break_json(b);
                v["ok"] = json!(false);
                v
            }
            Verdict::BehindCheckpoint(behind) => {
                let mut v = behind.first().map(break_json).unwrap_or_else(|| json!({}));
                v["ok"] = json!(false);
                v["behind_checkpoint"] = json!(behind.iter().map(break_json).collect::<Vec<_>>());
                v
            }
            Verdict::CheckpointRefused(reason) => json!({ "ok": false, "checkpoint": "refused", "reason": reason }),
        }
    }
}

fn account_arg(a: &str) -> Result<AccountId, RuntimeError> {
    AccountId::parse(a).map_err(|_| RuntimeError::Other("--account: expected an account id (acc_…)".into()))
}

/// Verifies one account's chain, or every chain (every account's, deleted ones included, and
/// the platform's).
pub async fn verify(store: &dyn Store, key: &AuditChainKey, account: Option<&str>) -> Result<Verdict, RuntimeError> {
    let accounts = match account {
        Some(a) => vec![account_arg(a)?],
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
    let platform_events = match account {
        Some(_) => None,
        None => {
            let (events, head) = store.platform_chain().await?;
            match verify_platform_chain(key, &events, head.as_ref()) {
                Ok(n) => Some(n),
                Err(b) => return Ok(Verdict::Broken(b)),
            }
        }
    };
    Ok(Verdict::Intact {
        accounts: accounts.len(),
        events: total,
        platform_events,
        checkpoint_chains: None,
    })
}

/// Every event of an account, oldest first, as JSON lines with `seq` and `mac` (hex). A
/// deleted account's chain (ending in `account.deleted`) is exported as well.
pub async fn export(store: &dyn Store, account: &str) -> Result<Vec<String>, RuntimeError> {
    let account = account_arg(account)?;
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

fn platform_event_json(e: &PlatformEvent) -> Value {
    json!({
        "id": e.id,
        "seq": e.seq,
        "at": UnixMillis(e.at).rfc3339(),
        "actor": e.actor,
        "action": e.action,
        "provider": e.provider,
        "key_last4": e.key_last4,
        "account_id": e.account_id,
        "kek_id": e.kek_id,
        "detail": e.detail,
        "mac": hex::encode(&e.mac),
    })
}

/// The platform's events, oldest first, as JSON lines with `seq` and `mac` (hex).
pub async fn export_platform(store: &dyn Store) -> Result<Vec<String>, RuntimeError> {
    let (events, _) = store.platform_chain().await?;
    Ok(events.iter().map(|e| platform_event_json(e).to_string()).collect())
}

/// The bytes a checkpoint's signature covers: the format label, the time, then each chain's
/// id, seq and MAC, each length-prefixed, in the order listed.
fn checkpoint_bytes(at_ms: i64, chains: &[(String, ChainHead)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + chains.len() * 96);
    out.extend_from_slice(CHECKPOINT_FORMAT.as_bytes());
    out.extend_from_slice(&at_ms.to_be_bytes());
    out.extend_from_slice(&(chains.len() as u64).to_be_bytes());
    for (chain, head) in chains {
        out.extend_from_slice(&(chain.len() as u64).to_be_bytes());
        out.extend_from_slice(chain.as_bytes());
        out.extend_from_slice(&head.seq.to_be_bytes());
        out.extend_from_slice(&(head.mac.len() as u64).to_be_bytes());
        out.extend_from_slice(&head.mac);
    }
    out
}

/// `keyward audit checkpoint`: the head of every chain now, signed.
pub async fn checkpoint(store: &dyn Store, key: &CheckpointSigningKey, now: UnixMillis) -> Result<Value, RuntimeError> {
    let heads = store.chain_heads().await?;
    let signature = key.sign(&checkpoint_bytes(now.as_i64(), &heads));
    Ok(json!({
        "format": CHECKPOINT_FORMAT,
        "at": now.rfc3339(),
        "at_ms": now.as_i64(),
        "chains": heads
            .iter()
            .map(|(chain, h)| json!({ "chain": chain, "seq": h.seq, "mac": hex::encode(&h.mac) }))
            .collect::<Vec<_>>(),
        "public_key": hex::encode(key.public_key()),
        "signature": hex::encode(signature),
    }))
}

/// A checkpoint's chains, once its signature has been checked against `key`.
fn read_checkpoint(text: &str, key: &CheckpointSigningKey) -> Result<Vec<(String, ChainHead)>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not a checkpoint (JSON: {e})"))?;
    if v["format"] != CHECKPOINT_FORMAT {
        return Err(format!("not a checkpoint (format is not {CHECKPOINT_FORMAT})"));
    }
    let at_ms = v["at_ms"].as_i64().ok_or("not a checkpoint (no at_ms)")?;
    let hex_field = |v: &Value, name: &str| -> Result<Vec<u8>, String> {
        v[name]
            .as_str()
            .and_then(|s| hex::decode(s).ok())
            .ok_or_else(|| format!("not a checkpoint ({name} is not hex)"))
    };
    let mut chains = Vec::new();
    for c in v["chains"].as_array().ok_or("not a checkpoint (no chains)")? {
        let chain = c["chain"].as_str().ok_or("not a checkpoint (a chain without id)")?;
        let seq = c["seq"].as_i64().ok_or("not a checkpoint (a chain without seq)")?;
        chains.push((
            chain.to_owned(),
            ChainHead {
                seq,
                mac: hex_field(c, "mac")?,
            },
        ));
    }
    let signature = hex_field(&v, "signature")?;
    if hex_field(&v, "public_key")? != key.public_key() {
        return Err("signed by another key than KEYWARD_AUDIT_CHECKPOINT_KEY's".to_owned());
    }
    if !verify_checkpoint_signature(&key.public_key(), &checkpoint_bytes(at_ms, &chains), &signature) {
        return Err("the signature does not verify: the checkpoint was altered or forged".to_owned());
    }
    Ok(chains)
}

/// Where a chain stands against its checkpoint entry: `None` when it still reaches it.
fn behind(chain: &str, at: &ChainHead, seq_and_macs: &[(i64, &[u8])]) -> Option<ChainBreak> {
    if at.seq <= 0 {
        return None;
    }
    let now_seq = seq_and_macs.last().map_or(0, |(s, _)| *s);
    let broke = |reason: String| ChainBreak {
        account_id: chain.to_owned(),
        event_id: None,
        seq: at.seq,
        reason,
    };
    match seq_and_macs.iter().find(|(s, _)| *s == at.seq) {
        None if now_seq == 0 => Some(broke(format!(
            "the checkpoint has this chain at seq {}, and it is gone: deleted",
            at.seq
        ))),
        None => Some(broke(format!(
            "the checkpoint has this chain at seq {}, and it now ends at seq {now_seq}: rolled back",
            at.seq
        ))),
        Some((_, mac)) if *mac != at.mac.as_slice() => Some(broke(format!(
            "event seq {} is not the one the checkpoint signed: the chain was rewritten after it",
            at.seq
        ))),
        Some(_) => None,
    }
}

/// `keyward audit verify --checkpoint FILE`: see the module doc. `account` limits both the
/// verification and the checkpoint's chains to one account.
pub async fn verify_against_checkpoint(
    store: &dyn Store,
    chain_key: &AuditChainKey,
    signing_key: &CheckpointSigningKey,
    checkpoint_text: &str,
    account: Option<&str>,
) -> Result<Verdict, RuntimeError> {
    let chains = match read_checkpoint(checkpoint_text, signing_key) {
        Ok(c) => c,
        Err(reason) => return Ok(Verdict::CheckpointRefused(reason)),
    };
    let verdict = verify(store, chain_key, account).await?;
    let Verdict::Intact {
        accounts,
        events,
        platform_events,
        ..
    } = verdict
    else {
        return Ok(verdict);
    };
    let mut late = Vec::new();
    let mut checked = 0;
    for (chain, at) in &chains {
        if account.is_some_and(|a| a != chain) {
            continue;
        }
        checked += 1;
        let found = if chain == PLATFORM_CHAIN {
            let (events, _) = store.platform_chain().await?;
            behind(
                chain,
                at,
                &events.iter().map(|e| (e.seq, e.mac.as_slice())).collect::<Vec<_>>(),
            )
        } else {
            let Ok(id) = AccountId::parse(chain) else {
                late.push(ChainBreak {
                    account_id: chain.clone(),
                    event_id: None,
                    seq: at.seq,
                    reason: "the checkpoint names a chain that is neither an account nor the platform".to_owned(),
                });
                continue;
            };
            let (events, _) = store.audit_chain(&id).await?;
            behind(
                chain,
                at,
                &events.iter().map(|e| (e.seq, e.mac.as_slice())).collect::<Vec<_>>(),
            )
        };
        late.extend(found);
    }
    if !late.is_empty() {
        return Ok(Verdict::BehindCheckpoint(late));
    }
    Ok(Verdict::Intact {
        accounts,
        events,
        platform_events,
        checkpoint_chains: Some(checked),
    })
}
