//! `keyward catalogue show` and `keyward catalogue check`: the model catalogue in force, and
//! how it compares with what each provider lists today.
//!
//! `check` asks each provider's free model listing through a worker (started by this
//! process, as `kek rewrap` does) with the platform's shared key, so the key is opened only
//! there, as for any call.

use keyward_core::{Catalogue, KeyBinding, KeyOwner, ModelStatus, Provider};
use keyward_providers::{build_list_models, parse_model_page};
use keyward_store::Store;
use keyward_worker_protocol::protocol::FailKind;
use serde_json::{json, Value};

use crate::config::Config;
use crate::engine::calls::worker_call;
use crate::runtime::RuntimeError;
use crate::workers::{SoloWorker, WorkerCommand};

/// Largest page of a model listing read.
const MAX_LISTING: usize = 4 * 1024 * 1024;
/// Pages followed at most (1000 models each).
const MAX_PAGES: usize = 20;

/// The catalogue in force: the built-in one, or `KEYWARD_CATALOGUE`'s file, checked (a file
/// with an unknown field, a broken lifecycle entry, or without exactly one active probe model
/// per provider is refused, naming the problem).
pub fn load(config: &Config) -> Result<Catalogue, RuntimeError> {
    let Some(path) = &config.catalogue else {
        return Ok(Catalogue::builtin());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| RuntimeError::Other(format!("KEYWARD_CATALOGUE {}: {e}", path.display())))?;
    Catalogue::from_toml(&text).map_err(|e| RuntimeError::Other(format!("KEYWARD_CATALOGUE {}: {e}", path.display())))
}

/// The catalogue in force, as JSON: per provider, each model's id, name, status, dates,
/// replacement, prices, whether it is the probe, and the page it was checked against.
pub fn show(catalogue: &Catalogue) -> Value {
    serde_json::to_value(catalogue).unwrap_or(Value::Null)
}

/// How a check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckVerdict {
    /// Every active and probe model is still listed.
    Current,
    /// A provider no longer lists these active or probe models (`provider/id`): the
    /// catalogue needs an update.
    ModelsGone(Vec<String>),
    /// A provider could not be asked (no shared key, unreachable, refused).
    Unchecked,
}

/// What one provider's check found, and the active or probe models it no longer lists.
fn provider_report(catalogue: &Catalogue, provider: Provider, listed: &[String]) -> (Value, Vec<String>) {
    let mut gone = Vec::new();
    let mut blocking = Vec::new();
    for m in catalogue.models(provider) {
        if listed.iter().any(|id| id == &m.id) {
            continue;
        }
        if m.probe || m.status == ModelStatus::Active {
            blocking.push(format!("{provider}/{}{}", m.id, if m.probe { " (probe)" } else { "" }));
        }
        gone.push(json!({
            "id": m.id,
            "status": m.status.as_str(),
            "probe": m.probe,
            // Retired models are expected to be gone; deprecated ones soon will be.
            "expected": m.status == ModelStatus::Retired,
        }));
    }
    let report = json!({
        "provider": provider,
        "checked": true,
        "listed": listed.len(),
        "not_listed": gone,
        "ok": blocking.is_empty(),
    });
    (report, blocking)
}

/// Checks the catalogue against each provider's listing (or just `only`). Returns the JSON
/// report and the verdict.
pub async fn check(
    catalogue: &Catalogue,
    store: &dyn Store,
    worker: &WorkerCommand,
    data_dir: &std::path::Path,
    provider_timeout_ms: u32,
    only: Option<Provider>,
) -> Result<(Value, CheckVerdict), String> {
    let providers: Vec<Provider> = only.map_or_else(|| Provider::ALL.to_vec(), |p| vec![p]);
    let mut solo: Option<SoloWorker> = None;
    let mut reports = Vec::new();
    let mut verdict = CheckVerdict::Current;
    for provider in providers {
        let key = store.shared_key(provider).await.map_err(|e| e.to_string())?;
        let Some(key) = key else {
            verdict = worse(verdict, CheckVerdict::Unchecked);
            reports.push(json!({
                "provider": provider,
                "checked": false,
                "reason": format!(
                    "no shared key is configured for {}: keyward admin set-shared-key --provider {provider}",
                    provider.display_name()
                ),
            }));
            continue;
        };
        let worker = match solo.as_mut() {
            Some(w) => w,
            None => solo.insert(SoloWorker::start(worker, data_dir, "catalogue").await?),
        };
        match list_all(worker, provider, &key, provider_timeout_ms).await? {
            Ok(listed) => {
                let (report, blocking) = provider_report(catalogue, provider, &listed);
                if !blocking.is_empty() {
                    verdict = worse(verdict, CheckVerdict::ModelsGone(blocking));
                }
                reports.push(report);
            }
            Err(why) => {
                verdict = worse(verdict, CheckVerdict::Unchecked);
                reports.push(json!({ "provider": provider, "checked": false, "reason": why }));
            }
        }
    }
    Ok((json!({ "providers": reports }), verdict))
}

/// `ModelsGone` (all of them together) outranks `Unchecked`, which outranks `Current`.
fn worse(a: CheckVerdict, b: CheckVerdict) -> CheckVerdict {
    match (a, b) {
        (CheckVerdict::ModelsGone(mut x), CheckVerdict::ModelsGone(y)) => {
            x.extend(y);
            CheckVerdict::ModelsGone(x)
        }
        (gone @ CheckVerdict::ModelsGone(_), _) | (_, gone @ CheckVerdict::ModelsGone(_)) => gone,
        (CheckVerdict::Unchecked, _) | (_, CheckVerdict::Unchecked) => CheckVerdict::Unchecked,
        _ => CheckVerdict::Current,
    }
}

/// Every model id the provider lists, following its pages. `Ok(Err(why))` when the provider
/// could not be asked or refused (the reason a person reads).
async fn list_all(
    worker: &mut SoloWorker,
    provider: Provider,
    key: &keyward_store::StoredKey,
    timeout_ms: u32,
) -> Result<Result<Vec<String>, String>, String> {
    let mut ids = Vec::new();
    let mut page: Option<String> = None;
    for n in 0..MAX_PAGES {
        let call = build_list_models(provider, page.as_deref());
        let binding = KeyBinding {
            owner: KeyOwner::SharedPool,
            provider,
            key_id: key.key_id.clone(),
        };
        let request = worker_call(
            u64::try_from(n).unwrap_or(0) + 1,
            binding,
            key.sealed.as_bytes(),
            call,
            timeout_ms,
        );
        let answer = match worker.call(&request, MAX_LISTING).await? {
            Ok(a) => a,
            Err((FailKind::Connect | FailKind::Timeout | FailKind::Io, why)) => {
                return Ok(Err(format!("{} could not be reached: {why}", provider.display_name())))
            }
            Err((kind, why)) => return Ok(Err(format!("the worker could not ask ({kind:?}): {why}"))),
        };
        match parse_model_page(provider, answer.status, &answer.body) {
            Ok(p) => {
                ids.extend(p.ids);
                match p.next {
                    Some(next) => page = Some(next),
                    None => return Ok(Ok(ids)),
                }
            }
            Err(f) => {
                return Ok(Err(format!(
                    "{} refused the listing ({}): {}",
                    provider.display_name(),
                    f.diagnosis,
                    f.message
                )))
            }
        }
    }
    Ok(Err(format!(
        "{} listed more than {MAX_PAGES} pages of models",
        provider.display_name()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gone_active_model_fails_the_check_a_retired_one_does_not() {
        let cat = Catalogue::builtin();
        let all: Vec<String> = cat.served(Provider::OpenAi).map(|m| m.id.clone()).collect();
        let (report, blocking) = provider_report(&cat, Provider::OpenAi, &all);
        assert!(blocking.is_empty(), "{report}");
        // gpt-4-turbo is retired: listed as not listed, expected.
        assert_eq!(report["not_listed"][0]["id"], "gpt-4-turbo");
        assert_eq!(report["not_listed"][0]["expected"], true);
        let without_probe: Vec<String> = all.iter().filter(|id| *id != "gpt-6-luna").cloned().collect();
        let (report, blocking) = provider_report(&cat, Provider::OpenAi, &without_probe);
        assert_eq!(blocking, ["openai/gpt-6-luna (probe)"]);
        assert_eq!(report["ok"], false);
        assert!(report["not_listed"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "gpt-6-luna" && m["probe"] == true));
        let gone = |m: &str| CheckVerdict::ModelsGone(vec![m.to_owned()]);
        assert_eq!(worse(gone("a"), CheckVerdict::Unchecked), gone("a"));
        assert_eq!(worse(CheckVerdict::Unchecked, gone("b")), gone("b"));
        assert_eq!(
            worse(gone("a"), gone("b")),
            CheckVerdict::ModelsGone(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            worse(CheckVerdict::Current, CheckVerdict::Unchecked),
            CheckVerdict::Unchecked
        );
    }

    #[test]
    fn show_lists_every_entry_with_its_lifecycle() {
        let v = show(&Catalogue::builtin());
        let anthropic = v["anthropic"].as_array().unwrap();
        let haiku3 = anthropic.iter().find(|m| m["id"] == "claude-3-haiku-20240307").unwrap();
        assert_eq!(haiku3["status"], "retired");
        assert_eq!(haiku3["replaced_by"], "claude-haiku-5-5");
        assert!(anthropic.iter().any(|m| m["probe"] == true && m["status"] == "active"));
    }
}
