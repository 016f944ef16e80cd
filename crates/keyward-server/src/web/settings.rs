//! `GET /settings/ai/model-keys` and its forms, `POST /settings/ai/model-keys/{provider}/{action}`
//! with `action` one of `save`, `source`, `test`, `remove`.
//!
//! Each action runs the same engine function as the JSON API ([`crate::engine`]), after the
//! same checks in the same order (membership 404, provider 404, role 403, plan 403, key
//! format 422), then answers
//! `303` back to the page (post/redirect/get), where the outcome is shown next to the control
//! that caused it. Errors are the API's messages, which never hold a key; the key field is
//! always empty on the page that follows.
//!
//! "Test key" sent by the page's script (`X-Keyward-Fetch: 1`) is answered with JSON
//! `{"ok", "html"}` (the message, rendered and escaped here) instead of the redirect.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyward_core::{ErrorCode, KeySource, Provider};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;

use super::common::{forbidden_form_page, html, not_found_page, read_form, see_other, session, SETTINGS_PATH};
use super::sessions::{Control, Flash};
use super::{csrf, pages, sessions};
use crate::engine::keys::{parse_provider, parse_source};
use crate::engine::Actor;
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiQuery;
use crate::state::AppState;

#[derive(Debug, Deserialize)]
pub struct PageQuery {
    account: Option<String>,
}

/// The page for an error that is not about one control.
pub fn error_page(e: &ApiError) -> Response {
    match e.code {
        ErrorCode::NotFound | ErrorCode::UnknownProvider => not_found_page(),
        code => html(
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            pages::message_page(
                "Something went wrong",
                &sentence(&e.message),
                Some((SETTINGS_PATH, "Reload")),
            ),
        ),
    }
}

/// An API message as a sentence: capital first letter, full stop.
pub fn sentence(message: &str) -> String {
    let m = message.trim();
    let mut chars = m.chars();
    let mut out: String = chars.next().map(|c| c.to_uppercase().collect()).unwrap_or_default();
    out.push_str(chars.as_str());
    if !out.ends_with(['.', '!', '?']) {
        out.push('.');
    }
    out
}

/// `GET /settings/ai/model-keys[?account=ID]`.
pub async fn page(State(state): State<AppState>, headers: HeaderMap, ApiQuery(q): ApiQuery<PageQuery>) -> Response {
    let s = match session(&state, &headers).await {
        Ok(Some(s)) => s,
        Ok(None) => return see_other("/login"),
        Err(page) => return page,
    };
    let engine = &state.engine;
    let user = &s.view.user;
    let accounts = match engine.memberships(user).await {
        Ok(a) => a,
        Err(e) => return error_page(&e),
    };
    let actor = match q.account.as_deref().filter(|a| !a.is_empty()) {
        Some(a) => match engine.actor(user, a).await {
            Ok(actor) => actor,
            Err(e) => return error_page(&e),
        },
        None => match accounts.first() {
            Some(m) => Actor::member(user.clone(), m.clone()),
            None => {
                return html(
                    StatusCode::OK,
                    pages::message_page(
                        "No account yet",
                        "You are not a member of any account, so there are no model keys to show. Ask an account owner to add you.",
                        None,
                    ),
                )
            }
        },
    };
    let states = match engine.provider_states(&actor).await {
        Ok(s) => s,
        Err(e) => return error_page(&e),
    };
    let usage = match engine.month_usage(&actor).await {
        Ok(u) => u,
        Err(e) => return error_page(&e),
    };
    let Some(current) = actor.membership() else {
        return error_page(&crate::error::ApiError::not_found());
    };
    let health = match engine.key_health(&actor, &states).await {
        Ok(h) => h,
        Err(e) => return error_page(&e),
    };
    let flash = match sessions::take_flash(engine.store.as_ref(), &s.id).await {
        Ok(f) => f,
        Err(e) => return error_page(&e.into()),
    };
    let body = pages::model_keys_page(&pages::PageView {
        email: user.email.as_str(),
        csrf: &s.view.csrf,
        accounts: &accounts,
        current: &current,
        states: &states,
        usage: &usage,
        catalogue: &engine.catalogue,
        flash: flash.as_ref(),
        health: &health,
    });
    html(StatusCode::OK, body)
}

#[derive(Deserialize)]
struct ActionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    account: String,
    api_key: Option<SecretString>,
    source: Option<String>,
    confirm: Option<String>,
}

fn failed_title(control: Control) -> &'static str {
    match control {
        Control::Key => "Key not saved.",
        Control::Source => "Key source not changed.",
        Control::Test => "Key not tested.",
        Control::Remove => "Key not removed.",
    }
}

/// `POST /settings/ai/model-keys/{provider}/{action}`.
pub async fn action(
    State(state): State<AppState>,
    Path((provider, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let control = match action.as_str() {
        "save" => Control::Key,
        "source" => Control::Source,
        "test" => Control::Test,
        "remove" => Control::Remove,
        _ => return not_found_page(),
    };
    let s = match session(&state, &headers).await {
        Ok(Some(s)) => s,
        Ok(None) => return see_other("/login"),
        Err(page) => return page,
    };
    if !csrf::same_origin(&headers) {
        return forbidden_form_page();
    }
    let form: ActionForm = match read_form(&state, body).await {
        Ok(f) => f,
        Err(res) => return res,
    };
    if !csrf::token_matches(&s.view.csrf, &form.csrf) {
        return forbidden_form_page();
    }
    let by_script = headers.get("x-keyward-fetch").is_some_and(|v| v.as_bytes() == b"1");
    let what = match control {
        Control::Key => "saving a key",
        Control::Source => "switching the key source",
        Control::Test => "testing a key",
        Control::Remove => "removing a key",
    };
    let engine = &state.engine;
    // Membership (404), provider (404), role (403): the API's order.
    let manager = async {
        let actor = engine.actor(&s.view.user, &form.account).await?;
        let provider = parse_provider(&provider)?;
        actor.may_manage_keys(what)?;
        ApiResult::Ok((actor, provider))
    };
    let (actor, provider) = match manager.await {
        Ok(found) => found,
        Err(e) => match (e.code, provider.parse::<Provider>()) {
            (ErrorCode::NotFound | ErrorCode::UnknownProvider, _) | (_, Err(_)) => return not_found_page(),
            (_, Ok(p)) => {
                // Only reached by a member of this account (a role refusal).
                let flash = failure(&form.account, p, control, &e);
                return finish(&state, &s.id, flash, by_script).await;
            }
        },
    };
    let account = actor.account_id().as_str().to_owned();
    let name = provider.display_name();
    let flash = match control {
        Control::Key => {
            let raw = form.api_key.as_ref().map(|k| k.expose_secret()).unwrap_or_default();
            let saved = engine.save_key(&actor, provider, raw).await;
            match saved {
                Ok(saved) => {
                    let masked = saved.state.key.as_ref().map(|k| k.last4.masked()).unwrap_or_default();
                    // A kind of key the provider no longer takes is saved, with the warning.
                    let notice = saved
                        .state
                        .key
                        .as_ref()
                        .and_then(|k| k.kind)
                        .and_then(keyward_core::KeyKind::notice)
                        .map_or_else(String::new, |n| format!(" {n}"));
                    let (title, detail) = if saved.rotated {
                        (
                            "Key replaced.",
                            format!("The old {name} key was overwritten; the new one shows as {masked}.{notice}"),
                        )
                    } else {
                        (
                            "Key saved.",
                            format!("Your {name} key shows as {masked}. Switch to My key to use it.{notice}"),
                        )
                    };
                    ok(&account, provider, control, title, Some(detail))
                }
                Err(e) => failure(&account, provider, control, &e),
            }
        }
        Control::Source => {
            let switched = match parse_source(form.source.as_deref().unwrap_or_default()) {
                Ok(source) => engine.switch_source(&actor, provider, source).await,
                Err(e) => Err(e),
            };
            match switched {
                Ok(after) if after.source == KeySource::Own => ok(
                    &account,
                    provider,
                    control,
                    "Now using My key.",
                    Some(format!("{name} calls run on your own key, with no Aiemaily caps.")),
                ),
                Ok(_) => ok(
                    &account,
                    provider,
                    control,
                    "Now using Aiemaily shared.",
                    Some(format!("{name} calls use shared credits; your saved key is kept.")),
                ),
                Err(e) => failure(&account, provider, control, &e),
            }
        }
        Control::Test => match engine.test_key(&actor, provider).await {
            Ok(r) if r.ok => ok(
                &account,
                provider,
                control,
                "Key works.",
                Some(format!("{} answered in {} ms.", r.model, r.latency_ms)),
            ),
            Ok(r) => {
                let status = r.provider_status.map_or_else(String::new, |s| format!(" (HTTP {s})"));
                let message = r.message.as_deref().unwrap_or_default();
                // keyward's own failure to connect is not something the provider said.
                let detail = if r.diagnosis == Some(keyward_providers::Diagnosis::Unreachable) {
                    format!("keyward's connection to {name} failed: {message}")
                } else {
                    format!("{name} said{status}: “{message}”")
                };
                Flash {
                    account: account.clone(),
                    provider,
                    control,
                    ok: false,
                    title: format!("Test failed. {}", pages::failure_words(r.status(), Some(&r.found))),
                    detail: Some(detail),
                }
            }
            Err(e) => failure(&account, provider, control, &e),
        },
        Control::Remove => {
            if form.confirm.as_deref() == Some("yes") {
                match engine.remove_key(&actor, provider).await {
                    Ok(()) => ok(
                        &account,
                        provider,
                        control,
                        "Key removed.",
                        Some(format!("The {name} key is deleted; {name} calls use Aiemaily shared.")),
                    ),
                    Err(e) => failure(&account, provider, control, &e),
                }
            } else {
                failure(
                    &account,
                    provider,
                    control,
                    &ApiError::validation("confirm the removal with \"Yes, remove key\""),
                )
            }
        }
    };
    if by_script {
        // The script also refreshes the card's "Last test" from what was just stored.
        let last_test = match control {
            Control::Test => engine
                .provider_state(&actor, provider)
                .await
                .ok()
                .and_then(|st| st.key)
                .map(|k| pages::last_test_html(&k)),
            _ => None,
        };
        return Json(json!({ "ok": flash.ok, "html": pages::message_html(&flash), "last_test": last_test }))
            .into_response();
    }
    finish(&state, &s.id, flash, false).await
}

fn ok(account: &str, provider: Provider, control: Control, title: &str, detail: Option<String>) -> Flash {
    Flash {
        account: account.to_owned(),
        provider,
        control,
        ok: true,
        title: title.to_owned(),
        detail,
    }
}

fn failure(account: &str, provider: Provider, control: Control, e: &ApiError) -> Flash {
    Flash {
        account: account.to_owned(),
        provider,
        control,
        ok: false,
        title: failed_title(control).to_owned(),
        detail: Some(sentence(&e.message)),
    }
}

/// The page's script gets the message; a plain form gets a redirect to the page showing it.
async fn finish(state: &AppState, session_id: &str, flash: Flash, by_script: bool) -> Response {
    if by_script {
        return Json(json!({ "ok": flash.ok, "html": pages::message_html(&flash) })).into_response();
    }
    let to = format!(
        "{SETTINGS_PATH}?account={}#provider-{}",
        flash.account,
        flash.provider.as_str()
    );
    // The account id was checked (it names an account the caller belongs to), so it is
    // `acc_` and hex: safe in a URL.
    sessions::set_flash(state.engine.store.as_ref(), session_id, &flash).await;
    see_other(&to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_as_sentences() {
        assert_eq!(sentence("no key is saved"), "No key is saved.");
        assert_eq!(sentence("Done."), "Done.");
        assert_eq!(sentence(""), ".");
    }
}
