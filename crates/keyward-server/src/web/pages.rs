//! The settings page's HTML, built as escaped strings.
//!
//! Every value that did not come from this file (names, e-mail addresses, ids, provider
//! messages, error messages) goes through [`esc`]. No inline script or style anywhere: the
//! Content-Security-Policy (`default-src 'self'`) would refuse them; styles and the small
//! script are served from `/assets/`.

use keyward_core::{
    format_hint, format_rules, Catalogue, KeyKind, KeySource, ModelStatus, Plan, Provider, Role, UnixMillis,
};
use keyward_store::{KeyCallHealth, KeyMeta, Membership, ProviderState};

use super::sessions::{Control, Flash};
use crate::api::KeyTestFindings;
use crate::engine::probe::test_findings;
use crate::engine::usage::MonthUsage;

/// Escapes text for HTML element content and double- or single-quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A whole number with thousands separators: `20000` → `20,000`.
pub fn group(n: i64) -> String {
    let digits: Vec<char> = n.unsigned_abs().to_string().chars().collect();
    let groups: Vec<String> = digits.rchunks(3).rev().map(|g| g.iter().collect()).collect();
    let out = groups.join(",");
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

fn month_name(d: &time::OffsetDateTime) -> &'static str {
    MONTHS
        .get(usize::from(u8::from(d.month())).saturating_sub(1))
        .copied()
        .unwrap_or("")
}

/// `24 Nov 2025, 16:00 UTC`.
pub fn when(t: UnixMillis) -> String {
    let d = t.to_datetime();
    format!(
        "{} {} {}, {:02}:{:02} UTC",
        d.day(),
        month_name(&d),
        d.year(),
        d.hour(),
        d.minute()
    )
}

/// `2025-11-24T16:00:00Z`, for `<time datetime>`.
fn iso(t: UnixMillis) -> String {
    t.rfc3339()
}

/// A Test key diagnosis in plain words.
pub fn diagnosis_words(status: &str) -> &'static str {
    match status {
        "invalid_key" => "The provider did not accept this key: it is wrong, revoked or expired.",
        "no_credit" => "The key is valid, but its provider account has no credit left.",
        "missing_permission" => "The key is not allowed to run this model: check its permissions or project.",
        "model_not_available" => "The test model is not available to this key.",
        "key_reported_leaked" => "The provider reported this key as leaked and blocks it: replace it with a new key.",
        "rate_limited" => "The provider is rate-limiting this key right now: try again in a moment.",
        "provider_unavailable" => "The provider is unavailable or overloaded right now: try again later.",
        "unreachable" => "keyward could not connect to the provider from this server (its own network, DNS or TLS, or the provider is down); the provider said nothing.",
        "bad_request" => "The provider refused the test request.",
        "malformed_response" => "The provider's answer could not be read.",
        _ => "The test failed.",
    }
}

fn plan_name(p: Plan) -> &'static str {
    match p {
        Plan::Free => "Free",
        Plan::Pro => "Pro",
        Plan::Business => "Business",
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Owner => "Owner",
        Role::Admin => "Admin",
        Role::Member => "Member",
    }
}

/// The document around a page's main content.
fn document(title: &str, header_right: &str, main: &str) -> String {
    format!(
        r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title} · Aiemaily</title>
<link rel="icon" href="/assets/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/assets/keyward.css">
<script src="/assets/model-keys.js" defer></script>
</head>
<body>
<a class="skip" href="#main">Skip to main content</a>
<header class="topbar">
<div class="brand"><span class="mark" aria-hidden="true"></span><span>Aiemaily</span></div>
{header_right}
</header>
<main id="main" tabindex="-1">
{main}
</main>
</body>
</html>
"##,
        title = esc(title),
    )
}

/// The document around a page's main content, for the other page modules.
pub fn document_page(title: &str, header_right: &str, main: &str) -> String {
    document(title, header_right, main)
}

/// A page with a heading, a sentence and an optional link (errors, "not found").
pub fn message_page(title: &str, text: &str, link: Option<(&str, &str)>) -> String {
    let link = link.map_or_else(String::new, |(href, label)| {
        format!(
            r#"<p><a class="button secondary" href="{}">{}</a></p>"#,
            esc(href),
            esc(label)
        )
    });
    let main = format!(
        r#"<div class="narrow"><h1>{}</h1><p class="lede">{}</p>{link}</div>"#,
        esc(title),
        esc(text)
    );
    document(title, "", &main)
}

/// `/login`: a token field (masked) and "Log in"; `notice` says something went well (signed out).
pub fn login_page(
    csrf: &str,
    error: Option<&str>,
    notice: Option<&str>,
    sso: Option<&str>,
    token_login: bool,
) -> String {
    let notice = notice.map_or_else(String::new, |n| {
        format!(r#"<p class="msg ok" role="status" id="login-notice">{}</p>"#, esc(n))
    });
    // A refused token: the field is invalid, and described by its hint and the error.
    let (error_html, invalid, described) = match error {
        Some(e) => (
            format!(r#"<p class="msg err" id="token-error">{}</p>"#, esc(e)),
            r#" aria-invalid="true""#,
            "token-hint token-error",
        ),
        None => (String::new(), "", "token-hint"),
    };
    let sso_html = sso.map_or_else(String::new, |label| {
        format!(
            r#"<p class="card login"><a class="button primary" id="sso" href="/login/oidc">Sign in with {}</a></p>"#,
            esc(label)
        )
    });
    let token_html = if token_login {
        format!(
            r#"<form class="card login" method="post" action="/login">
<input type="hidden" name="csrf" value="{csrf}">
<label for="token">Access token</label>
<input type="password" id="token" name="token" autocomplete="off" spellcheck="false" autocapitalize="off" required aria-describedby="{described}"{invalid}>
<p class="hint" id="token-hint">Paste the <code>kw_…</code> token you were given by <code>keyward admin create-user</code> or at first start.</p>
<div role="alert" aria-live="assertive">{error_html}</div>
<button type="submit" class="{class}">Log in</button>
</form>"#,
            csrf = esc(csrf),
            class = if sso.is_some() { "secondary" } else { "primary" },
        )
    } else {
        format!(r#"<div role="alert" aria-live="assertive">{error_html}</div>"#)
    };
    let main = format!(
        r#"<div class="narrow">
<h1>Log in</h1>
{notice}
<p class="lede">Sign in to manage your account's AI model keys.</p>
{sso_html}
{token_html}
</div>"#,
    );
    document("Log in", "", &main)
}

/// After single sign-on: the session is set; the page moves on to `next` by itself (a
/// same-site navigation, which sends the new session cookie) or by its link.
pub fn signed_in_page(next: &str) -> String {
    let main = format!(
        r#"<div class="narrow"><h1>Signed in</h1><p class="lede">You are signed in.</p><p><a class="button primary" id="continue" href="{next}">Continue to model keys</a></p></div>"#,
        next = esc(next)
    );
    document("Signed in", "", &main).replacen(
        "<head>",
        &format!(r#"<head><meta http-equiv="refresh" content="0;url={}">"#, esc(next)),
        1,
    )
}

/// What the model-keys page shows.
#[derive(Debug)]
pub struct PageView<'a> {
    pub email: &'a str,
    pub csrf: &'a str,
    /// Every account of the user (for the switcher).
    pub accounts: &'a [Membership],
    /// The account shown.
    pub current: &'a Membership,
    pub states: &'a [ProviderState],
    pub usage: &'a MonthUsage,
    pub catalogue: &'a Catalogue,
    pub flash: Option<&'a Flash>,
    /// Each saved key's calls, from the audit log.
    pub health: &'a [(Provider, KeyCallHealth)],
}

/// The signed-in person, "Log out" and "Sign out everywhere", at the top right of a page.
pub fn who(email: &str, csrf: &str) -> String {
    format!(
        r#"<div class="who"><span class="email">{email}</span>
<form method="post" action="/logout"><input type="hidden" name="csrf" value="{csrf}"><button type="submit" class="link">Log out</button></form>
<form method="post" action="/logout/everywhere"><input type="hidden" name="csrf" value="{csrf}"><button type="submit" class="link" id="sign-out-everywhere">Sign out everywhere</button></form></div>"#,
        email = esc(email),
        csrf = esc(csrf),
    )
}

/// `/settings/ai/model-keys`.
pub fn model_keys_page(v: &PageView<'_>) -> String {
    let account = &v.current.account;
    let header_right = who(v.email, v.csrf);
    let mut main = String::new();
    main.push_str(
        r#"<nav class="crumbs" aria-label="Breadcrumb"><ol><li>Settings</li><li>AI</li><li><span aria-current="page">Model keys</span></li></ol></nav>"#,
    );
    main.push_str(&format!(
        r#"<div class="page-head"><div><h1>Model keys</h1>
<p class="lede">Run AI on your own Anthropic, OpenAI or Google AI credits, with no Aiemaily usage caps. Keys are envelope-encrypted, opened only in an isolated worker, and never shown again: you see only their last four characters.</p></div>
{switcher}</div>"#,
        switcher = account_switcher(v),
    ));
    main.push_str(&notices(v));
    main.push_str(&usage_panel(v));
    main.push_str(r#"<div class="cards">"#);
    for p in Provider::ALL {
        if let Some(s) = v.states.iter().find(|s| s.provider == p) {
            main.push_str(&card(v, s));
        }
    }
    main.push_str("</div>");
    main.push_str(&format!(
        r#"<p class="footnote">Every key action and AI call of {} is written to its audit log with the provider and, for your own keys, the key's last four characters. <a href="{}?account={}" id="activity-link">See the activity</a> (also as CSV).</p>"#,
        esc(&account.name),
        super::common::ACTIVITY_PATH,
        esc(account.id.as_str()),
    ));
    document("Model keys · Settings", &header_right, &main)
}

fn account_switcher(v: &PageView<'_>) -> String {
    let current = &v.current.account;
    if v.accounts.len() < 2 {
        return format!(
            r#"<div class="account-pill"><span class="muted">Account</span> <strong>{}</strong> <span class="plan">{}</span></div>"#,
            esc(&current.name),
            plan_name(current.plan)
        );
    }
    let mut options = String::new();
    for m in v.accounts {
        let selected = if m.account.id == current.id { " selected" } else { "" };
        options.push_str(&format!(
            r#"<option value="{}"{selected}>{} ({}, {})</option>"#,
            esc(m.account.id.as_str()),
            esc(&m.account.name),
            plan_name(m.account.plan),
            role_name(m.role).to_lowercase(),
        ));
    }
    format!(
        r#"<form class="switcher" method="get" action="/settings/ai/model-keys">
<label for="account">Account</label>
<div class="inline"><select id="account" name="account">{options}</select>
<button type="submit" class="secondary">Switch</button></div>
</form>"#
    )
}

fn notices(v: &PageView<'_>) -> String {
    let m = v.current;
    let mut out = String::new();
    if !m.role.can_manage_keys() {
        out.push_str(&format!(
            r#"<div class="notice info" role="note"><strong>View only.</strong> You are a member of {}. Only its owners and admins can save, test, switch or remove model keys; ask one of them for changes.</div>"#,
            esc(&m.account.name)
        ));
    }
    if !m.account.plan.allows_own_keys() {
        out.push_str(&format!(
            r#"<div class="notice warn" role="note" id="plan-note"><strong>Your own keys need a paid plan.</strong> {} is on the Free plan, so its AI features run on Aiemaily shared credits, which are capped each month. Upgrade to {} or Business to connect your own Anthropic, OpenAI or Google AI key and run AI on your own credits with no caps.</div>"#,
            esc(&m.account.name),
            plan_name(Plan::FIRST_PAID)
        ));
    }
    out
}

fn usage_panel(v: &PageView<'_>) -> String {
    let u = v.usage;
    let used = u.credits_used();
    let limit = u.credit_limit;
    let start = u.month.start.to_datetime();
    let last_day = u.month.end.to_datetime() - time::Duration::seconds(1);
    let period = format!(
        "{} {} – {} {} {}",
        start.day(),
        MONTHS
            .get(usize::from(u8::from(start.month())).saturating_sub(1))
            .copied()
            .unwrap_or(""),
        last_day.day(),
        MONTHS
            .get(usize::from(u8::from(last_day.month())).saturating_sub(1))
            .copied()
            .unwrap_or(""),
        last_day.year()
    );
    let mut own_total = 0;
    for p in Provider::ALL {
        own_total += u.of(p, KeySource::Own).0;
    }
    format!(
        r#"<section class="card usage" aria-labelledby="usage-h">
<div class="usage-head"><h2 id="usage-h">Aiemaily shared usage this month</h2><span class="muted">{period}</span></div>
<p class="usage-figure"><strong>{used}</strong> of {limit} credits used <span class="muted">· {remaining} left · {plan} plan</span></p>
<progress id="usage-bar" max="{max}" value="{value}" aria-label="Shared credits used this month">{used} of {limit}</progress>
<p class="hint">Calls on Aiemaily shared are metered against these credits and stop when they run out. {own_keys}</p>
</section>"#,
        used = group(used),
        limit = group(limit),
        remaining = group(u.credits_remaining()),
        plan = plan_name(v.current.account.plan),
        max = limit.max(1),
        value = used.min(limit.max(1)).max(0),
        own_keys = if v.current.account.plan.allows_own_keys() {
            format!(
                "Calls on your own key are not capped ({} this month).",
                match own_total {
                    1 => "1 request".to_owned(),
                    n => format!("{} requests", group(n)),
                }
            )
        } else {
            format!(
                "Your own keys, which are not capped, need the {} or Business plan.",
                plan_name(Plan::FIRST_PAID)
            )
        },
    )
}

fn flash_for<'a>(v: &'a PageView<'_>, provider: Provider, control: Control) -> Option<&'a Flash> {
    v.flash
        .filter(|f| f.provider == provider && f.control == control && f.account == v.current.account.id.as_str())
}

/// A live region for one control's messages; empty until there is one. The message in it
/// has the id [`message_id`] of the region (a field's `aria-describedby` names it when the
/// message is that field's error).
fn live_region(id: &str, flash: Option<&Flash>) -> String {
    let inner = flash.map_or_else(String::new, |f| message_with_id(f, Some(&message_id(id))));
    format!(r#"<div class="live" id="{id}" role="status" aria-live="polite">{inner}</div>"#)
}

/// The id of the message in the live region `region`.
fn message_id(region: &str) -> String {
    format!("{region}-text")
}

/// One message: a bold title and an optional detail.
pub fn message_html(f: &Flash) -> String {
    message_with_id(f, None)
}

fn message_with_id(f: &Flash, id: Option<&str>) -> String {
    let class = if f.ok { "ok" } else { "err" };
    let detail = f
        .detail
        .as_deref()
        .map_or_else(String::new, |d| format!(r#" <span class="detail">{}</span>"#, esc(d)));
    let id = id.map_or_else(String::new, |id| format!(r#" id="{}""#, esc(id)));
    format!(
        r#"<p class="msg {class}"{id}><strong>{}</strong>{detail}</p>"#,
        esc(&f.title)
    )
}

/// What a failed test means, in words: the provider's own advice where it gave one that
/// keyward recognised, else the diagnosis in plain words.
pub fn failure_words(status: &str, found: Option<&KeyTestFindings>) -> String {
    if let Some(advice) = found.and_then(|f| f.advice.as_deref()) {
        return advice.to_owned();
    }
    if status == "model_not_available" {
        if let Some(f) = found.filter(|f| f.key_valid == Some(true)) {
            let models = f.models.as_deref().unwrap_or_default();
            return if models.is_empty() {
                "The key works, but the test model is not available to it, and none of the catalogued models is."
                    .to_owned()
            } else {
                format!(
                    "The key works, but the test model is not available to it. It can use: {}.",
                    models.join(", ")
                )
            };
        }
    }
    diagnosis_words(status).to_owned()
}

/// One limit in words: "999 of 1,000 requests left, full again at 2026-12-07T12:40:59Z".
fn limit_words(what: &str, l: &keyward_providers::Limit) -> Option<String> {
    let amount = match (l.remaining, l.limit) {
        (Some(r), Some(n)) => format!("{} of {} {what} left", group_u(r), group_u(n)),
        (Some(r), None) => format!("{} {what} left", group_u(r)),
        (None, Some(n)) => format!("limit {} {what}", group_u(n)),
        (None, None) => return None,
    };
    // Anthropic gives the time the bucket is full again, OpenAI how long until then.
    Some(match &l.reset {
        Some(reset) if reset.contains('T') => format!("{amount}, full again at {}", esc(reset)),
        Some(reset) => format!("{amount}, full again in {}", esc(reset)),
        None => amount,
    })
}

fn group_u(n: u64) -> String {
    group(i64::try_from(n).unwrap_or(i64::MAX))
}

/// "What this key can do": the rate-limit headroom and the models the last test saw.
pub fn abilities_html(found: &KeyTestFindings) -> String {
    let mut lines: Vec<String> = Vec::new();
    if let Some(l) = &found.rate_limits {
        for (what, limit) in [
            ("requests", &l.requests),
            ("tokens", &l.tokens),
            ("input tokens", &l.input_tokens),
            ("output tokens", &l.output_tokens),
        ] {
            if let Some(words) = limit.as_ref().and_then(|l| limit_words(what, l)) {
                lines.push(words);
            }
        }
    }
    if let Some(note) = &found.rate_limits_note {
        lines.push(esc(note));
    }
    if let (Some(true), Some(models)) = (found.key_valid, &found.models) {
        let list = if models.is_empty() {
            "none of the catalogued models".to_owned()
        } else {
            esc(&models.join(", "))
        };
        lines.push(format!("Models this key can use: {list}"));
    }
    if lines.is_empty() {
        return String::new();
    }
    let items: String = lines.iter().map(|l| format!("<li>{l}</li>")).collect();
    format!(r#"<div class="abilities"><span class="label">What this key can do</span><ul>{items}</ul></div>"#)
}

/// The "Last test" of a saved key, with what the test found.
pub fn last_test_html(key: &KeyMeta) -> String {
    let Some(t) = &key.last_test else {
        return r#"<span class="muted">Not tested yet</span>"#.to_owned();
    };
    let at = format!(r#"<time datetime="{}">{}</time>"#, iso(t.at), when(t.at));
    let found = test_findings(t);
    let abilities = found.as_ref().map_or_else(String::new, abilities_html);
    if t.ok {
        let what = t.message.strip_prefix("ok: ").unwrap_or(&t.message);
        format!(
            r#"<span class="good">Worked</span> · {at} <span class="muted">({})</span>{abilities}"#,
            esc(what)
        )
    } else {
        let (status, message) = t.message.split_once(": ").unwrap_or(("", t.message.as_str()));
        // keyward's own failure to connect is not something the provider said.
        let said = if status == "unreachable" {
            ""
        } else {
            "The provider said: "
        };
        format!(
            r#"<span class="bad">Failed</span> · {at}<br><span class="muted">{} {said}“{}”</span>{abilities}"#,
            esc(&failure_words(status, found.as_ref())),
            esc(message)
        )
    }
}

/// The models of a card: served ones, a deprecated one with its retirement date.
fn models_html(catalogue: &Catalogue, p: Provider) -> String {
    let models: Vec<String> = catalogue
        .served_chat(p)
        .map(|m| match (m.status, &m.retires_on) {
            (ModelStatus::Deprecated, Some(d)) => format!(
                r#"{} <span class="deprecated">(deprecated, retires <time datetime="{d}">{}</time>)</span>"#,
                esc(&m.name),
                esc(d),
                d = esc(d)
            ),
            _ => esc(&m.name),
        })
        .collect();
    models.join(" · ")
}

fn card(v: &PageView<'_>, s: &ProviderState) -> String {
    let p = s.provider;
    let id = p.as_str();
    let name = p.display_name();
    let m = v.current;
    let manage = m.role.can_manage_keys();
    let paid = m.account.plan.allows_own_keys();
    let account_id = m.account.id.as_str();
    let own = s.source == KeySource::Own;
    let badge = if own {
        r#"<span class="badge own">Using My key</span>"#
    } else {
        r#"<span class="badge shared">Using Aiemaily shared</span>"#
    };
    let (own_req, _, _) = v.usage.of(p, KeySource::Own);
    let (shared_req, _, _) = v.usage.of(p, KeySource::Shared);

    let saved = match &s.key {
        Some(k) => format!(
            r#"<span class="masked" data-last4="{last4}">{masked}</span> <span class="muted">saved <time datetime="{iso}">{when}</time></span>"#,
            last4 = esc(k.last4.as_str()),
            masked = esc(&k.last4.masked()),
            iso = iso(k.updated_at),
            when = when(k.updated_at),
        ),
        None => r#"<span class="muted">No key saved</span>"#.to_owned(),
    };
    let mut warnings = String::new();
    if let Some(k) = &s.key {
        if let Some(at) = k.reported_leaked_at {
            warnings.push_str(&format!(
                r#"<div class="notice danger" role="alert" id="leaked-{id}"><strong>{name} reported this key as leaked</strong> (<time datetime="{iso}">{when}</time>) and blocks it. Calls that use it are refused, and they do not fall back to Aiemaily shared. Create a new key in your {name} dashboard, save it here to replace this one, and delete the leaked one.</div>"#,
                iso = iso(at),
                when = when(at),
            ));
        }
        if let Some(notice) = k.kind.and_then(KeyKind::notice) {
            warnings.push_str(&format!(
                r#"<div class="notice warn" role="note" id="notice-{id}">{}</div>"#,
                esc(notice)
            ));
        }
    }
    let health = v.health.iter().find(|(hp, _)| *hp == p).map(|(_, h)| h);
    if let (Some(k), Some(h)) = (&s.key, health) {
        if h.failing() {
            warnings.push_str(&failing_warning(p, k, h));
        }
    }
    let mut facts = format!(
        r#"<dl class="facts">
<div><dt>Models</dt><dd>{models}</dd></div>
<div><dt>Key format</dt><dd><code>{rules}</code></dd></div>
<div><dt>Saved key</dt><dd>{saved}</dd></div>"#,
        models = models_html(v.catalogue, p),
        rules = esc(format_rules(p)),
    );
    if let Some(k) = &s.key {
        facts.push_str(&format!(
            r#"<div><dt>Last test</dt><dd id="last-test-{id}">{}</dd></div>"#,
            last_test_html(k)
        ));
    }
    if let (Some(_), Some(h)) = (&s.key, health) {
        facts.push_str(&format!(
            r#"<div><dt>Calls on this key</dt><dd id="health-{id}">{}</dd></div>"#,
            health_html(h)
        ));
    }
    facts.push_str(&format!(
        r#"<div><dt>This month</dt><dd>{} on My key · {} on Aiemaily shared</dd></div></dl>"#,
        requests(own_req),
        requests(shared_req)
    ));

    let hidden = format!(
        r#"<input type="hidden" name="csrf" value="{}"><input type="hidden" name="account" value="{}">"#,
        esc(v.csrf),
        esc(account_id)
    );
    let action = |what: &str| format!("/settings/ai/model-keys/{id}/{what}");

    let mut controls = String::new();
    if manage {
        // Save / rotate.
        let key_flash = flash_for(v, p, Control::Key);
        if paid {
            // A refused key: the field is invalid, and described by its hint and its error.
            let region = format!("msg-{id}-key");
            let (invalid, described) = if key_flash.is_some_and(|f| !f.ok) {
                (r#" aria-invalid="true""#, format!("hint-{id} {}", message_id(&region)))
            } else {
                ("", format!("hint-{id}"))
            };
            let (label, button) = if s.key.is_some() {
                ("Replace key", "Save new key")
            } else {
                ("API key", "Save")
            };
            controls.push_str(&format!(
                r#"<form class="control save" method="post" action="{act}">{hidden}
<label for="key-{id}">{label}</label>
<div class="inline"><input type="password" id="key-{id}" name="api_key" autocomplete="off" spellcheck="false" autocapitalize="off" placeholder="{ph}" required aria-describedby="{described}"{invalid}>
<button type="submit" class="primary">{button}</button></div>
<p class="hint" id="hint-{id}">Paste the key from your {name} dashboard. It is masked as you paste it{rotate}.</p>
{live}
</form>"#,
                act = action("save"),
                ph = esc(format_hint(p)),
                rotate = if s.key.is_some() {
                    "; saving a new key replaces the saved one at once"
                } else {
                    ""
                },
                live = live_region(&region, key_flash),
            ));
        } else {
            controls.push_str(&format!(
                r#"<div class="control"><p class="hint locked" id="hint-{id}">Saving your own {name} key needs the {} or Business plan.</p>{}</div>"#,
                plan_name(Plan::FIRST_PAID),
                live_region(&format!("msg-{id}-key"), key_flash),
            ));
        }

        // Source switch.
        let has_key = s.key.is_some();
        let pressed = |on: bool| if on { "true" } else { "false" };
        let own_disabled = if has_key { "" } else { " disabled" };
        let source_hint = if !has_key {
            "Save a key to switch to it. Until then every call uses Aiemaily shared."
        } else if own {
            "Calls run on your key, with no Aiemaily caps. Switching back to shared keeps your key saved."
        } else {
            "Calls run on Aiemaily shared credits. Your saved key is kept until you switch to it."
        };
        controls.push_str(&format!(
            r#"<div class="control split"><form class="source" method="post" action="{act}">{hidden}
<fieldset><legend>Key source</legend>
<div class="segmented" role="group" aria-describedby="src-hint-{id}">
<button type="submit" name="source" value="shared" aria-pressed="{sh}">Aiemaily shared</button><button type="submit" name="source" value="own" aria-pressed="{ow}"{own_disabled}>My key</button>
</div>
<p class="hint" id="src-hint-{id}">{source_hint}</p>
{live}
</fieldset>
</form>"#,
            act = action("source"),
            sh = pressed(!own),
            ow = pressed(own),
            live = live_region(&format!("msg-{id}-source"), flash_for(v, p, Control::Source)),
        ));

        // Test and remove.
        let test_disabled = if has_key {
            String::new()
        } else {
            format!(r#" disabled aria-describedby="test-hint-{id}""#)
        };
        let test_hint = if has_key {
            String::new()
        } else {
            format!(r#"<p class="hint" id="test-hint-{id}">Save a key to test it.</p>"#)
        };
        let remove = match &s.key {
            Some(k) => format!(
                r#"<details class="remove"><summary class="button danger-outline">Remove</summary>
<form method="post" action="{act}">{hidden}
<p>Remove the saved {name} key <span class="masked">{masked}</span>? It is deleted at once{fallback}.</p>
<button type="submit" name="confirm" value="yes" class="danger">Yes, remove key</button>
</form></details>"#,
                act = action("remove"),
                masked = esc(&k.last4.masked()),
                fallback = if own {
                    " and calls switch back to Aiemaily shared"
                } else {
                    ""
                },
            ),
            None => String::new(),
        };
        controls.push_str(&format!(
            r#"<div class="key-actions"><span class="label">Check or remove the key</span>
<div class="actions">
<form method="post" action="{act}" data-enhance="test" data-result="msg-{id}-test" data-last-test="last-test-{id}">{hidden}
<button type="submit" class="secondary"{test_disabled}>Test key</button>
</form>
{remove}
</div>
{test_hint}</div></div>
{test_live}{remove_live}"#,
            act = action("test"),
            test_live = live_region(&format!("msg-{id}-test"), flash_for(v, p, Control::Test)),
            remove_live = live_region(&format!("msg-{id}-remove"), flash_for(v, p, Control::Remove)),
        ));
    }

    if !manage {
        // A member has no controls; a refused form (posted by hand) is still explained.
        let any = v
            .flash
            .filter(|f| f.provider == p && f.account == v.current.account.id.as_str());
        controls.push_str(&live_region(&format!("msg-{id}"), any));
    }

    format!(
        r#"<section class="card provider" id="provider-{id}" aria-labelledby="h-{id}">
<div class="card-head"><h2 id="h-{id}">{name}</h2>{badge}</div>
{warnings}{facts}
{controls}
</section>"#
    )
}

/// What to do about calls failing with `diagnosis`, in words.
pub fn failing_advice(p: Provider, diagnosis: &str) -> String {
    let name = p.display_name();
    match diagnosis {
        "invalid_key" => format!("{name} does not accept this key (it is wrong, revoked or expired). Replace the key: create a new one in your {name} dashboard and save it here."),
        "no_credit" => format!("The {name} account behind this key has no credit left. Add credit (or a payment method) in your {name} billing settings."),
        "missing_permission" => format!("The key is not allowed to run the model. Give the key the permissions it needs in your {name} dashboard, or use a project key that has them."),
        "key_reported_leaked" => format!("{name} reported this key as leaked and blocks it. Replace the key now with a new one, and delete the leaked one in your {name} dashboard."),
        "rate_limited" => format!("{name} is rate-limiting this key. Slow down, or raise the key's rate limits in your {name} dashboard."),
        other => diagnosis_words(other).to_owned(),
    }
}

/// A diagnosis as words for a list: `invalid_key` → "invalid key".
pub fn diagnosis_label(diagnosis: &str) -> String {
    diagnosis.replace('_', " ")
}

/// The warning of a key whose newest call failed.
fn failing_warning(p: Provider, k: &KeyMeta, h: &KeyCallHealth) -> String {
    let id = p.as_str();
    let newest = h.failures.iter().max_by_key(|f| f.last_at);
    let (diagnosis, at) = newest.map_or(("", k.updated_at), |f| (f.diagnosis.as_str(), f.last_at));
    format!(
        r#"<div class="notice danger" role="alert" id="failing-{id}" data-diagnosis="{d}"><strong>Calls on this key are failing ({label}).</strong> {advice} The newest failure was at <time datetime="{iso}">{when}</time>. Failed calls are not moved to Aiemaily shared: they keep failing until the key works again or you switch to Aiemaily shared yourself.</div>"#,
        d = esc(diagnosis),
        label = esc(&diagnosis_label(diagnosis)),
        advice = esc(&failing_advice(p, diagnosis)),
        iso = iso(at),
        when = when(at),
    )
}

/// A key's calls from the audit log: the last one that worked, the failures of the last
/// 24 hours by diagnosis, and where rate-limit headroom comes from.
pub fn health_html(h: &KeyCallHealth) -> String {
    let last_ok = match h.last_ok_at {
        Some(at) => format!(r#"Last worked <time datetime="{}">{}</time>"#, iso(at), when(at)),
        None => "No call has worked on this key yet".to_owned(),
    };
    let failures = if h.failures.is_empty() {
        "no failed calls in the last 24 h".to_owned()
    } else {
        let by: Vec<String> = h
            .failures
            .iter()
            .map(|f| format!("{} {}", group(f.count), esc(&diagnosis_label(&f.diagnosis))))
            .collect();
        let n = h.failed();
        format!(
            "{} failed call{} in the last 24 h: {}",
            group(n),
            if n == 1 { "" } else { "s" },
            by.join(", ")
        )
    };
    format!(
        r#"{last_ok} · <span class="{class}">{failures}</span><br><span class="muted">Rate-limit headroom is what the last test saw (under Last test); AI calls do not record it.</span>"#,
        class = if h.failing() { "bad" } else { "muted" },
    )
}

fn requests(n: i64) -> String {
    match n {
        1 => "1 request".to_owned(),
        n => format!("{} requests", group(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn esc_escapes_everything_that_could_open_markup() {
        assert_eq!(esc("plain text"), "plain text");
        assert_eq!(
            esc(r#"<script>alert("x")</script>"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;"
        );
        assert_eq!(esc("a & b's"), "a &amp; b&#39;s");
        assert_eq!(esc("\" onmouseover='x'"), "&quot; onmouseover=&#39;x&#39;");
        assert_eq!(esc("••••ab_-"), "••••ab_-");
        // Escaping is not idempotent by accident: an escaped entity is escaped again.
        assert_eq!(esc("&amp;"), "&amp;amp;");
        for s in ["<", ">", "\"", "'", "&"] {
            let e = esc(s);
            assert!(!e.contains(['<', '>', '"', '\'']), "{s} → {e}");
        }
    }

    #[test]
    fn numbers_and_times_read_well() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(20_000), "20,000");
        assert_eq!(group(1_234_567), "1,234,567");
        assert_eq!(group(-1_000), "-1,000");
        assert_eq!(when(UnixMillis(1_764_000_000_123)), "24 Nov 2025, 16:00 UTC");
    }

    #[test]
    fn pages_escape_what_they_show() {
        let page = message_page("<b>", "a < b", Some(("/x?a=1&b=2", "Go")));
        assert!(page.contains("&lt;b&gt;") && !page.contains("<b>"));
        assert!(page.contains("/x?a=1&amp;b=2"));
        let login = login_page("tok\"en", Some("<no>"), None, None, true);
        assert!(login.contains("value=\"tok&quot;en\""));
        assert!(login.contains("&lt;no&gt;"));
        assert!(!login.contains("<script>") && !login.contains("style="));
    }

    #[test]
    fn every_diagnosis_has_words() {
        for d in keyward_providers::Diagnosis::ALL {
            assert_ne!(diagnosis_words(d.as_str()), "The test failed.", "{d}");
        }
    }
}
