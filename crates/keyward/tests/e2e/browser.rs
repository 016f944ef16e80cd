//! The settings page in a real browser: Debian's `chromium`, driven over WebDriver by
//! `chromedriver` (started here on a free port) through `fantoccini`, against the real binary
//! and the fake providers.
//!
//! Without chromium and chromedriver these tests print a skip line, or fail when
//! `KEYWARD_TEST_REQUIRE_ALL=1` (as in CI, whose `.ci/run` installs them).
//!
//! `owner_manages_keys_in_a_real_browser` writes `target/screenshots/model-keys.png`: the page
//! with three saved keys; `the_model_keys_page_works_from_the_keyboard` writes
//! `keyboard-focus.png`: a card with its Save button focused from the keyboard.
//!
//! `every_page_passes_axe_core_in_each_state` runs axe-core (npm, pinned in `tests/a11y`) on
//! every page in each state and prints a table of pages × violations (`-- --nocapture`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use keyward_core::Provider;
use keyward_fakes::{Behaviour, FakeProviders};
use keyward_testkit::Keyward;
use serde_json::{json, Value};

use crate::ai_support::start_on_fake;
use crate::common::*;
use crate::web::{login_url, SETTINGS};

/// `name` on the PATH (or in /usr/bin).
#[allow(
    clippy::disallowed_methods,
    reason = "finding test programs, not keyward configuration"
)]
pub fn program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// chromium and chromedriver, or None after printing why the test is skipped (a failure
/// under `KEYWARD_TEST_REQUIRE_ALL=1`).
fn browser_tools(test: &str) -> Option<(PathBuf, PathBuf)> {
    match (program("chromium"), program("chromedriver")) {
        (Some(chromium), Some(driver)) => Some((chromium, driver)),
        _ => {
            keyward_testenv::skip_named(test, keyward_testenv::reasons::BROWSER);
            None
        }
    }
}

/// A chromedriver process group, killed on drop (chromedriver and the chromium it started).
struct Driver {
    child: Child,
    log: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless Chromium under WebDriver, with its own temp profile.
struct Browser {
    client: Client,
    _driver: Driver,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start(test: &str, javascript: bool) -> Option<Browser> {
        use std::os::unix::process::CommandExt;

        let (chromium, chromedriver) = browser_tools(test)?;
        let profile = tempfile::Builder::new().prefix("keyward-chromium-").tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = profile.path().join("chromedriver.log");
        let child = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", chromedriver.display()));
        let driver = Driver { child, log };
        let url = format!("http://127.0.0.1:{port}");
        let probe = keyward_testkit::reqwest::Client::builder().no_proxy().build().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = probe.get(format!("{url}/status")).send().await;
            if let Ok(r) = ready {
                let v: Value = r.json().await.unwrap_or_default();
                if v["value"]["ready"] == true {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not start: {}",
                driver_log(&driver)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut args = vec![
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--no-first-run".to_owned(),
            "--window-size=1280,1000".to_owned(),
            "--lang=en-US".to_owned(),
            format!("--user-data-dir={}", profile.path().join("profile").display()),
        ];
        if !javascript {
            args.push("--blink-settings=scriptEnabled=false".to_owned());
        }
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": args },
        });
        let caps = caps.as_object().unwrap().clone();
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("WebDriver session: {e}\n{}", driver_log(&driver)));
        Some(Browser {
            client,
            _driver: driver,
            _profile: profile,
        })
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    async fn path(&self) -> String {
        let u = self.client.current_url().await.unwrap();
        match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_owned(),
        }
    }

    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        match self.client.find(Locator::Css(css)).await {
            Ok(e) => e,
            Err(e) => panic!("no element {css}: {e}\n{}", self.source().await),
        }
    }

    async fn count(&self, css: &str) -> usize {
        self.client.find_all(Locator::Css(css)).await.unwrap().len()
    }

    async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.unwrap()
    }

    async fn click(&self, css: &str) {
        self.find(css).await.click().await.unwrap();
    }

    async fn type_into(&self, css: &str, text: &str) {
        self.find(css).await.send_keys(text).await.unwrap();
    }

    /// A script's answer as a number (0 when it is not one).
    async fn number(&self, script: &str) -> u64 {
        self.client.execute(script, vec![]).await.unwrap().as_u64().unwrap_or(0)
    }

    async fn source(&self) -> String {
        self.client.source().await.unwrap_or_default()
    }

    /// Waits until the text of `css` contains `needle`; returns the text.
    async fn wait_text(&self, css: &str, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(el) = self.client.find(Locator::Css(css)).await {
                if let Ok(t) = el.text().await {
                    if t.contains(needle) {
                        return t;
                    }
                }
            }
            if Instant::now() > deadline {
                panic!("{css} never showed {needle:?}:\n{}", self.source().await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Panics if `key` (or any 12-character piece of it) is in the DOM or in any input's
    /// current value.
    async fn assert_key_gone(&self, key: &str, context: &str) {
        let dom = self.source().await;
        assert_no_leak(&dom, key, &format!("{context}: the DOM"));
        for input in self.client.find_all(Locator::Css("input")).await.unwrap() {
            let value = input.prop("value").await.unwrap().unwrap_or_default();
            assert_no_leak(&value, key, &format!("{context}: an input's value"));
        }
    }

    /// Saves `key` in `provider`'s card with the key field and "Save".
    async fn save_key(&self, provider: &str, key: &str) {
        self.type_into(&format!("#key-{provider}"), key).await;
        self.click(&format!("#provider-{provider} form.save button[type=submit]"))
            .await;
        self.wait_text(&format!("#msg-{provider}-key"), "Key").await;
    }

    /// Logs in through the login form with a token.
    async fn login_with_token(&self, base: &str, token: &str) {
        self.goto(&format!("{base}/login")).await;
        self.type_into("#token", token).await;
        self.click("form.login button[type=submit]").await;
        self.wait_text("h1", "Model keys").await;
        let path = self.path().await;
        assert!(path.starts_with(SETTINGS) && !path.contains(token), "{path}");
    }

    async fn logout(&self) {
        self.click(".who button[type=submit]").await;
        self.wait_text("h1", "Log in").await;
    }

    async fn close(self) {
        let _ = self.client.close().await;
    }
}

fn driver_log(d: &Driver) -> String {
    std::fs::read_to_string(&d.log)
        .unwrap_or_default()
        .lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .join("\n")
}

/// `target/screenshots/` of this build.
fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("screenshots")
}

fn provider(p: &str) -> Provider {
    p.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_manages_keys_in_a_real_browser() {
    let Some(b) = Browser::start("owner_manages_keys_in_a_real_browser", true).await else {
        return;
    };
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    let acc = kw.owner_account().to_owned();
    let t = kw.owner_token().to_owned();
    let keys: Vec<(&str, String)> = PROVIDERS.iter().map(|p| (*p, key_for(p))).collect();
    for (p, k) in &keys {
        fake.set_key(provider(p), k, Behaviour::Ok);
    }

    // Log in from the first-start URL: one click, and the code leaves the address bar.
    b.goto(&login_url(&kw)).await;
    b.wait_text("h1", "Model keys").await;
    assert_eq!(b.path().await, SETTINGS, "the code is not left in the address bar");
    assert!(b.text(".who .email").await.contains("owner@localhost"));
    for p in PROVIDERS {
        assert!(b.text(&format!("#provider-{p} .facts")).await.contains("No key saved"));
        let my_key = b.find(&format!("#provider-{p} button[name=source][value=own]")).await;
        assert!(
            !my_key.is_enabled().await.unwrap(),
            "My key is disabled until a key is saved"
        );
        assert!(b
            .text(&format!("#src-hint-{p}"))
            .await
            .contains("Save a key to switch to it"));
    }

    // Save a key for each provider: the card shows only ••••last4, the field is empty.
    for (p, k) in &keys {
        b.save_key(p, k).await;
        b.wait_text(&format!("#msg-{p}-key"), "Key saved.").await;
        let masked = b.text(&format!("#provider-{p} .facts .masked")).await;
        assert_eq!(masked, format!("••••{}", last4(k)), "{p}");
        let field = b.find(&format!("#key-{p}")).await;
        assert_eq!(
            field.prop("value").await.unwrap().unwrap_or_default(),
            "",
            "{p}: field emptied"
        );
        assert_eq!(field.attr("type").await.unwrap().as_deref(), Some("password"));
        assert_eq!(field.attr("autocomplete").await.unwrap().as_deref(), Some("off"));
    }
    for (p, k) in &keys {
        b.assert_key_gone(k, &format!("after saving {p}")).await;
    }
    let listed = list_keys(&kw, &t, &acc).await;
    for (p, k) in &keys {
        assert_eq!(listed[*p]["key"]["last4"], last4(k), "{p}");
    }

    // Test key with a good key: success, model and latency, without a reload (the script).
    b.client
        .execute("window.keywardMarker = 1; return null", vec![])
        .await
        .unwrap();
    b.click("#provider-anthropic form[data-enhance=test] button").await;
    let shown = b.wait_text("#msg-anthropic-test", "Key works.").await;
    assert!(shown.contains("claude-haiku-5-5 answered in"), "{shown}");
    let same_page = b
        .client
        .execute("return window.keywardMarker === 1", vec![])
        .await
        .unwrap();
    assert_eq!(same_page, json!(true), "the script ran the test without a reload");

    let last_test = b.text("#last-test-anthropic").await;
    assert!(
        last_test.contains("Worked"),
        "the script refreshed Last test: {last_test}"
    );
    b.click("#provider-anthropic button[name=source][value=own]").await;
    b.wait_text("#msg-anthropic-source", "Now using My key.").await;

    // The screenshot: the whole page with three saved keys (one tested, one on My key).
    let height = b.number("return document.documentElement.scrollHeight").await.max(800);
    let height = u32::try_from(height).unwrap();
    b.client.set_window_size(1280, height).await.unwrap();
    let inner = u32::try_from(b.number("return window.innerHeight").await).unwrap();
    if inner < height {
        b.client.set_window_size(1280, height + (height - inner)).await.unwrap();
    }
    b.client
        .execute("window.scrollTo(0, 0); return null", vec![])
        .await
        .unwrap();
    let png = b.client.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let dir = screenshot_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model-keys.png"), &png).unwrap();
    b.client.set_window_size(1280, 1000).await.unwrap();

    // Switch to My key and back; the key stays saved.
    b.click("#provider-openai button[name=source][value=own]").await;
    b.wait_text("#msg-openai-source", "Now using My key.").await;
    assert_eq!(b.text("#provider-openai .badge").await, "Using My key");
    let own = b.find("#provider-openai button[name=source][value=own]").await;
    assert_eq!(own.attr("aria-pressed").await.unwrap().as_deref(), Some("true"));
    assert_eq!(list_keys(&kw, &t, &acc).await["openai"]["source"], "own");
    b.click("#provider-openai button[name=source][value=shared]").await;
    b.wait_text("#msg-openai-source", "Now using Aiemaily shared.").await;
    assert_eq!(b.text("#provider-openai .badge").await, "Using Aiemaily shared");
    let listed = list_keys(&kw, &t, &acc).await;
    assert_eq!(listed["openai"]["source"], "shared");
    assert_eq!(
        listed["openai"]["key"]["last4"],
        last4(&keys[1].1),
        "switching back keeps the key"
    );

    // Rotate: a key the provider does not know replaces the saved one.
    let bad = openai_key();
    b.save_key("openai", &bad).await;
    b.wait_text("#msg-openai-key", "Key replaced.").await;
    assert_eq!(
        b.text("#provider-openai .facts .masked").await,
        format!("••••{}", last4(&bad))
    );
    assert_eq!(key_events(&kw, &t, &acc).await.last().unwrap()["action"], "key.rotated");
    // Test key with the bad key: the diagnosis in words and the provider's own message.
    b.click("#provider-openai form[data-enhance=test] button").await;
    let shown = b.wait_text("#msg-openai-test", "Test failed.").await;
    assert!(shown.contains("did not accept this key"), "{shown}");
    assert!(
        shown.contains("Incorrect API key provided"),
        "the provider's message: {shown}"
    );
    b.assert_key_gone(&bad, "after a failed test").await;
    b.assert_key_gone(&keys[1].1, "after rotation").await;

    // Remove after confirming.
    assert!(!b
        .find("#provider-google details.remove button[name=confirm]")
        .await
        .is_displayed()
        .await
        .unwrap());
    b.click("#provider-google details.remove summary").await;
    let confirm = b.find("#provider-google details.remove button[name=confirm]").await;
    assert!(confirm.is_displayed().await.unwrap(), "the confirmation opens");
    assert!(b
        .text("#provider-google details.remove")
        .await
        .contains(&format!("••••{}", last4(&keys[2].1))));
    confirm.click().await.unwrap();
    b.wait_text("#msg-google-remove", "Key removed.").await;
    assert!(b.text("#provider-google .facts").await.contains("No key saved"));
    assert!(list_keys(&kw, &t, &acc).await["google"]["key"].is_null());
    assert_eq!(b.count("#provider-google details.remove").await, 0);

    // Keyboard: every control is reachable with Tab (no tabindex tricks, real buttons).
    let tabbable = b
        .client
        .execute(
            "return Array.from(document.querySelectorAll('button, input:not([type=hidden]), select, summary, a[href]')).filter(e => e.tabIndex < 0).length",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(tabbable, json!(0), "every control is in the tab order");

    b.logout().await;
    b.goto(&format!("{}{SETTINGS}", kw.base_url())).await;
    b.wait_text("h1", "Log in").await;
    b.close().await;
    assert_audit_ok(&kw, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_action_works_without_javascript() {
    let Some(b) = Browser::start("every_action_works_without_javascript", false).await else {
        return;
    };
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    let acc = kw.owner_account().to_owned();
    let t = kw.owner_token().to_owned();
    let base = kw.base_url().to_owned();

    // A token login through the form (never in a URL).
    b.login_with_token(&base, &t).await;
    let good = key_for("google");
    fake.set_key(Provider::Google, &good, Behaviour::Ok);
    b.save_key("google", &good).await;
    b.wait_text("#msg-google-key", "Key saved.").await;
    b.assert_key_gone(&good, "no-JS save").await;

    b.click("#provider-google button[name=source][value=own]").await;
    b.wait_text("#msg-google-source", "Now using My key.").await;

    // Test key as a plain form: the page reloads with the result next to the button.
    b.click("#provider-google form[data-enhance=test] button").await;
    b.wait_text("#msg-google-test", "Key works.").await;
    assert!(
        b.path().await.starts_with(&format!("{SETTINGS}?account={acc}")),
        "a reload"
    );

    let bad = key_for("google");
    b.save_key("google", &bad).await;
    b.wait_text("#msg-google-key", "Key replaced.").await;
    b.click("#provider-google form[data-enhance=test] button").await;
    let shown = b.wait_text("#msg-google-test", "Test failed.").await;
    assert!(shown.contains("API key not valid"), "the provider's message: {shown}");

    // A key pasted into the wrong card: the reason, next to that field.
    let anthropic = key_for("anthropic");
    b.save_key("openai", &anthropic).await;
    let err = b.wait_text("#msg-openai-key", "Key not saved.").await;
    assert!(err.contains("Anthropic"), "{err}");
    b.assert_key_gone(&anthropic, "refused key").await;
    let field = b.find("#key-openai").await;
    assert_eq!(field.attr("aria-invalid").await.unwrap().as_deref(), Some("true"));

    b.click("#provider-google details.remove summary").await;
    b.click("#provider-google details.remove button[name=confirm]").await;
    b.wait_text("#msg-google-remove", "Key removed.").await;
    let listed = list_keys(&kw, &t, &acc).await;
    assert!(listed["google"]["key"].is_null());
    assert_eq!(listed["google"]["source"], "shared", "removal falls back to shared");
    b.logout().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_and_free_plans_in_a_real_browser() {
    let Some(b) = Browser::start("members_and_free_plans_in_a_real_browser", true).await else {
        return;
    };
    let kw: Keyward = start();
    let base = kw.base_url().to_owned();
    let (ana, acme) = pro_owner(&kw, "ana@example.com");
    let saved = key_for("openai");
    save_key(&kw, &ana.token, &acme, "openai", &saved).await;
    let mo = create_user(&kw, "mo@example.com");
    add_member(&kw, &acme, &mo.email, "member");
    let fay = create_user(&kw, "fay@example.com");
    add_member(&kw, &acme, &fay.email, "admin");
    let freebie = create_account(&kw, "Freebie", "free", &fay.email);

    // A member sees the keys (last4 only) and no control.
    b.login_with_token(&base, &mo.token).await;
    assert!(b.text(".notice.info").await.contains("View only."));
    assert_eq!(
        b.text("#provider-openai .facts .masked").await,
        format!("••••{}", last4(&saved))
    );
    for css in [
        "input[type=password]",
        "form.control",
        "details.remove",
        "button[name=source]",
        "form[data-enhance=test]",
    ] {
        assert_eq!(b.count(css).await, 0, "a member has no {css}");
    }
    b.assert_key_gone(&saved, "member view").await;
    b.logout().await;

    // Fay: admin of Acme and owner of a free account; the switcher takes her to it.
    b.login_with_token(&base, &fay.token).await;
    assert_eq!(b.count("#key-openai").await, 1, "an admin of a pro account can save");
    let switcher = b.find("select#account").await;
    let label = b.find("label[for=account]").await;
    assert_eq!(label.text().await.unwrap(), "Account");
    switcher.select_by_value(&freebie).await.unwrap();
    b.click("form.switcher button[type=submit]").await;
    let why = b.wait_text(".notice.warn", "Your own keys need a paid plan.").await;
    assert!(
        why.contains("Freebie is on the Free plan") && why.contains("Pro or Business"),
        "{why}"
    );
    assert_eq!(b.count("input[type=password]").await, 0, "no key field on a free plan");
    for p in PROVIDERS {
        let hint = b.text(&format!("#hint-{p}")).await;
        assert!(hint.contains("needs the Pro or Business plan"), "{p}: {hint}");
    }
    assert!(b.text(".usage").await.contains("of 1,000 credits used"));
    assert!(b.path().await.contains(&freebie));
    b.logout().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_todays_models_the_headroom_and_a_leaked_key() {
    let Some(b) = Browser::start("the_page_shows_todays_models_the_headroom_and_a_leaked_key", true).await else {
        return;
    };
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    b.goto(&login_url(&kw)).await;
    b.wait_text("h1", "Model keys").await;

    // Current models, a deprecated one with its retirement date, no retired one.
    let anthropic = b.text("#provider-anthropic .facts").await;
    assert!(
        anthropic.contains("Claude Haiku 5.5") && anthropic.contains("Claude Sonnet 5.5"),
        "{anthropic}"
    );
    assert!(
        anthropic.contains("Claude Opus 4.5 (deprecated, retires 2027-01-22)"),
        "{anthropic}"
    );
    assert!(
        !anthropic.contains("Claude 3"),
        "retired models are not offered: {anthropic}"
    );
    let openai = b.text("#provider-openai .facts").await;
    assert!(
        openai.contains("GPT-6 Luna") && openai.contains("GPT-4o (deprecated, retires 2027-01-14)"),
        "{openai}"
    );
    assert!(!openai.contains("GPT-4 Turbo"), "{openai}");
    let google = b.text("#provider-google .facts").await;
    assert!(
        google.contains("Gemini 3.8 Flash") && !google.contains("Gemini 1.5"),
        "{google}"
    );
    assert!(
        google.contains("AQ."),
        "the card names the key format of today: {google}"
    );

    // A test shows what the key can do: the provider's rate-limit headroom.
    let key = key_for("anthropic");
    fake.set_key(Provider::Anthropic, &key, Behaviour::Ok);
    b.save_key("anthropic", &key).await;
    b.click("#provider-anthropic form[data-enhance=test] button").await;
    b.wait_text("#msg-anthropic-test", "Key works.").await;
    let last_test = b.wait_text("#last-test-anthropic", "requests left").await;
    assert!(
        last_test.to_lowercase().contains("what this key can do") && last_test.contains("tokens left, full again at"),
        "{last_test}"
    );
    // Google sends no headroom, and the card says so.
    let gkey = key_for("google");
    fake.set_key(Provider::Google, &gkey, Behaviour::Leaked);
    b.save_key("google", &gkey).await;
    b.click("#provider-google form[data-enhance=test] button").await;
    let shown = b.wait_text("#msg-google-test", "Test failed.").await;
    assert!(shown.contains("reported as leaked"), "{shown}");

    // After a reload the card says the key was reported as leaked and must be replaced.
    b.goto(&format!("{}{SETTINGS}", kw.base_url())).await;
    let leaked = b.text("#leaked-google").await;
    assert!(
        leaked.contains("reported this key as leaked") && leaked.contains("save it here to replace"),
        "{leaked}"
    );
    assert_eq!(
        b.find("#leaked-google").await.attr("role").await.unwrap().as_deref(),
        Some("alert")
    );

    let dir = screenshot_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let height = u32::try_from(b.number("return document.documentElement.scrollHeight").await.max(800)).unwrap();
    b.client.set_window_size(1280, height + 100).await.unwrap();
    std::fs::write(dir.join("model-keys-leaked.png"), b.client.screenshot().await.unwrap()).unwrap();
    b.client.set_window_size(1280, 1000).await.unwrap();

    // Replacing it with a standard key clears the leak and shows the standard-key warning.
    let standard = google_standard_key();
    b.save_key("google", &standard).await;
    b.wait_text("#msg-google-key", "Key replaced.").await;
    assert!(b.text("#msg-google-key").await.contains("auth key"));
    assert_eq!(b.count("#leaked-google").await, 0);
    assert!(b
        .text("#notice-google")
        .await
        .contains("stopped accepting standard keys"));
    for k in [&key, &gkey, &standard] {
        b.assert_key_gone(k, "the page of today's providers").await;
    }
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_and_a_failing_key_in_a_real_browser() {
    let Some(b) = Browser::start("activity_and_a_failing_key_in_a_real_browser", false).await else {
        return;
    };
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    let (token, acc) = (kw.owner_token().to_owned(), kw.owner_account().to_owned());
    let key = key_for("openai");
    fake.set_key(Provider::OpenAi, &key, Behaviour::Ok);
    save_key(&kw, &token, &acc, "openai", &key).await;
    set_source(&kw, &token, &acc, "openai", "own").await;
    let call = json!({"provider": "openai", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "feature": "drafting"});
    kw.http()
        .post(&format!("/v1/accounts/{acc}/ai/messages"), Some(&token), &call)
        .await
        .expect_status(200);
    fake.set_key(Provider::OpenAi, &key, Behaviour::NoCredit);
    let failed = kw
        .http()
        .post(&format!("/v1/accounts/{acc}/ai/messages"), Some(&token), &call)
        .await;
    assert!(!failed.is_success(), "{failed}");

    // Without JavaScript: the card warns, and says what to do.
    b.login_with_token(kw.base_url(), &token).await;
    let warning = b.text("#failing-openai").await;
    assert!(
        warning.contains("Calls on this key are failing (no credit)") && warning.contains("Add credit"),
        "{warning}"
    );
    let health = b.text("#health-openai").await;
    assert!(
        health.contains("1 failed call in the last 24 h: 1 no credit"),
        "{health}"
    );
    let dir = screenshot_dir();
    std::fs::create_dir_all(&dir).unwrap();
    b.client.set_window_size(1280, 1000).await.unwrap();
    std::fs::write(
        dir.join("failing-key-card.png"),
        b.find("#provider-openai").await.screenshot().await.unwrap(),
    )
    .unwrap();

    // The activity page, reached by its link; the filters work by plain GET forms.
    b.click("#activity-link").await;
    b.wait_text("h1", "Activity").await;
    assert!(b.text("#chain-status").await.contains("The audit log verifies."));
    assert_eq!(b.count("#events tbody tr").await, 4, "saved, switched, two calls");
    let first = b.text("#events tbody tr").await;
    assert!(
        first.contains("AI call") && first.contains("Failed: no credit") && first.contains("drafting"),
        "{first}"
    );
    b.client.set_window_size(1400, 1000).await.unwrap();
    std::fs::write(dir.join("activity.png"), b.client.screenshot().await.unwrap()).unwrap();
    b.client.set_window_size(1280, 1000).await.unwrap();
    b.find("#f-source").await.select_by_value("shared").await.unwrap();
    b.click("form.filters button[type=submit]").await;
    b.wait_text("#activity-empty", "No events match these filters").await;
    assert!(b.path().await.contains("source=shared"));
    b.assert_key_gone(&key, "the activity page").await;
    b.close().await;
}

/// Single sign-on in Chromium against oidc-provider on loopback (see `oidc.rs`): "Sign in
/// with …" on the login page, the provider's redirects, keyward's callback and its same-site
/// step to the page (the session cookie is SameSite=Strict), then "Log out" through the
/// provider's end-session page back to keyward's login page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_sign_on_in_a_real_browser() {
    let test = "single_sign_on_in_a_real_browser";
    let Some((op, kw, _dir)) = crate::oidc::setup(test, &[]).await else {
        return;
    };
    crate::oidc::external_user(&kw, "ana-1", "ana@acme.test").await;
    add_member(&kw, kw.owner_account(), "ana@acme.test", "member");
    op.account("ana-1", "ana@acme.test", true).await;
    let Some(axe) = axe_script(test) else {
        return;
    };
    let Some(b) = Browser::start(test, true).await else {
        return;
    };
    let mut report = AxeReport::default();
    // A sign-in that fails (no pending login): its page, then the login page with "Sign in with …".
    b.goto(&format!("{}/login/oidc/callback?code=x&state=y", kw.base_url()))
        .await;
    b.wait_text("h1", "Single sign-on failed").await;
    report.check(&b, &axe, "single sign-on failed").await;
    b.goto(&format!("{}/login", kw.base_url())).await;
    report.check(&b, &axe, "login with single sign-on").await;
    report.finish();
    b.click("#sso").await;
    b.wait_text("h1", "Model keys").await;
    assert!(b.path().await.starts_with(SETTINGS));
    assert!(b.source().await.contains("ana@acme.test"));
    // Log out: keyward's session ends, then the provider's end-session page asks to confirm.
    b.click(".who button[type=submit]").await;
    b.click("button[name=logout][value=yes]").await;
    b.wait_text("h1", "Log in").await;
    assert!(b.path().await.starts_with("/login"), "{}", b.path().await);
    b.goto(&format!("{}{SETTINGS}", kw.base_url())).await;
    b.wait_text("h1", "Log in").await;
    b.close().await;
}

/// `tests/a11y/` of the workspace: axe-core's pinned `package.json` and `package-lock.json`.
fn a11y_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/a11y")
}

/// Only one test at a time runs `npm ci` (the others wait and then find it installed).
static AXE_INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// axe-core's `axe.min.js`, installed with `npm ci --prefix tests/a11y` (the pinned version of
/// its lock file) when it is not there yet; None after recording a skip when node or npm is
/// missing (a failure under `KEYWARD_TEST_REQUIRE_ALL=1`).
fn axe_script(test: &str) -> Option<String> {
    let dir = a11y_dir();
    let script = dir.join("node_modules/axe-core/axe.min.js");
    let _one = AXE_INSTALL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !script.is_file() {
        let (Some(_node), Some(npm)) = (program("node"), program("npm")) else {
            keyward_testenv::skip_named(test, keyward_testenv::reasons::AXE);
            return None;
        };
        let out = Command::new(npm)
            .args(["ci", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success() && script.is_file(),
            "npm ci --prefix tests/a11y failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Some(std::fs::read_to_string(&script).unwrap())
}

/// The rules axe-core runs: WCAG 2.0 and 2.1, levels A and AA, and its best practices.
const AXE_TAGS: [&str; 5] = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"];

impl Browser {
    /// axe-core on the page now shown: its violations (`[{id, impact, help, nodes: [{target,
    /// html, summary}]}]`), how many rules passed, and the rules it could not decide
    /// ("incomplete", for a person to review). Injects `axe` into the page (each page load
    /// needs it again).
    async fn axe(&self, axe: &str) -> AxeRun {
        self.client
            .execute(&format!("{axe}\n;return null;"), vec![])
            .await
            .unwrap();
        let run = r#"
var done = arguments[arguments.length - 1];
axe.run(document, { runOnly: arguments[0] }).then(function (r) {
  done({
    violations: r.violations.map(function (v) {
      return { id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map(function (n) {
        return { target: n.target, html: n.html, summary: n.failureSummary };
      }) };
    }),
    passes: r.passes.length,
    incomplete: r.incomplete.map(function (v) { return v.id + " (" + v.nodes.length + ")"; })
  });
}, function (e) { done({ error: String(e) }); });
"#;
        let found = self.client.execute_async(run, vec![json!(AXE_TAGS)]).await.unwrap();
        let (Some(violations), Some(passes), Some(incomplete)) = (
            found["violations"].as_array(),
            found["passes"].as_u64(),
            found["incomplete"].as_array(),
        ) else {
            panic!("axe-core did not run: {found}");
        };
        AxeRun {
            violations: violations.clone(),
            passes,
            incomplete: incomplete
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
        }
    }

    /// Waits for `css` to be on the page (a page after a form's redirect).
    async fn wait_for(&self, css: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.count(css).await == 0 {
            assert!(
                Instant::now() < deadline,
                "{css} never appeared:\n{}",
                self.source().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Presses `key` on the keyboard (to whatever has the focus).
    async fn press(&self, key: fantoccini::key::Key) {
        use fantoccini::actions::{InputSource, KeyAction, KeyActions};
        let c: char = key.into();
        let keys = KeyActions::new("keyboard".to_owned())
            .then(KeyAction::Down { value: c })
            .then(KeyAction::Up { value: c });
        self.client.perform_actions(keys).await.unwrap();
    }

    /// Every stop of Tab from the top of the page to its end, each asserted to show a focus
    /// indicator (a field with several parts, such as a month, counts once).
    async fn tab_order(&self) -> Vec<String> {
        let mut order: Vec<String> = Vec::new();
        for _ in 0..80 {
            self.press(fantoccini::key::Key::Tab).await;
            let (what, shown) = self.focused().await;
            if order.last() == Some(&what) {
                continue;
            }
            if what == "body" || order.contains(&what) {
                break;
            }
            assert!(shown, "{what} shows no focus indicator");
            order.push(what);
        }
        order
    }

    /// What has the focus, as `card: tag#id "text"` (card is the provider's section, if any),
    /// and whether it shows a focus indicator (a solid outline of 2px or more).
    async fn focused(&self) -> (String, bool) {
        let v = self
            .client
            .execute(
                r##"var e = document.activeElement;
if (!e || e === document.body) { return ["body", false]; }
var card = e.closest("section.provider");
var s = getComputedStyle(e);
var shown = s.outlineStyle === "solid" && parseFloat(s.outlineWidth) >= 2;
var name = e.tagName.toLowerCase() + (e.id ? "#" + e.id : "") + (e.name ? "[name=" + e.name + "]" : "") + (e.value && e.tagName === "BUTTON" ? "[value=" + e.value + "]" : "");
var text = (e.textContent || "").trim().replace(/\s+/g, " ").slice(0, 30);
return [(card ? card.id + ": " : "") + name + (text ? " \"" + text + "\"" : ""), shown];"##,
                vec![],
            )
            .await
            .unwrap();
        (v[0].as_str().unwrap_or_default().to_owned(), v[1] == json!(true))
    }
}

/// One line per violation: id, impact, help and the nodes it is on.
fn describe_violations(found: &[Value]) -> String {
    let mut out = String::new();
    for v in found {
        out.push_str(&format!(
            "  - {} ({}): {}\n",
            v["id"].as_str().unwrap_or("?"),
            v["impact"].as_str().unwrap_or("?"),
            v["help"].as_str().unwrap_or("?")
        ));
        for n in v["nodes"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "      at {} {}\n",
                n["target"],
                n["html"]
                    .as_str()
                    .unwrap_or_default()
                    .chars()
                    .take(160)
                    .collect::<String>()
            ));
            if let Some(s) = n["summary"].as_str() {
                out.push_str(&format!("         {}\n", s.replace('\n', " ")));
            }
        }
    }
    out
}

/// What axe-core found on one page.
struct AxeRun {
    violations: Vec<Value>,
    /// How many rules passed (none would mean axe-core checked nothing).
    passes: u64,
    /// The rules it could not decide, with their node counts.
    incomplete: Vec<String>,
}

/// axe-core's findings per page and state, printed as a table at the end.
#[derive(Default)]
struct AxeReport {
    rows: Vec<(String, AxeRun)>,
}

impl AxeReport {
    async fn check(&mut self, b: &Browser, axe: &str, state: &str) {
        let found = b.axe(axe).await;
        assert!(
            found.passes > 10,
            "{state}: axe-core passed only {} rules",
            found.passes
        );
        self.rows.push((state.to_owned(), found));
    }

    /// Prints every page and state with its violations; panics if there is any.
    fn finish(self) {
        let mut table = String::from("axe-core (wcag2a, wcag2aa, wcag21a, wcag21aa, best-practice):\n");
        let mut failed = String::new();
        for (state, found) in &self.rows {
            let ids: Vec<&str> = found.violations.iter().filter_map(|v| v["id"].as_str()).collect();
            table.push_str(&format!(
                "  {state:<46} {} violation(s) {:<24} {} rules passed; to review: {}\n",
                found.violations.len(),
                ids.join(" "),
                found.passes,
                if found.incomplete.is_empty() {
                    "none".to_owned()
                } else {
                    found.incomplete.join(", ")
                }
            ));
            if !found.violations.is_empty() {
                failed.push_str(&format!("{state}:\n{}", describe_violations(&found.violations)));
            }
        }
        eprintln!("{table}");
        assert!(failed.is_empty(), "axe-core found violations:\n{failed}\n{table}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_passes_axe_core_in_each_state() {
    const TEST: &str = "every_page_passes_axe_core_in_each_state";
    let Some(axe) = axe_script(TEST) else {
        return;
    };
    // axe-core is a script: this browser runs JavaScript (the pages need none).
    let Some(b) = Browser::start(TEST, true).await else {
        return;
    };
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    let (token, acc) = (kw.owner_token().to_owned(), kw.owner_account().to_owned());
    let base = kw.base_url().to_owned();
    let mut report = AxeReport::default();

    // Login: the form, then a refused token.
    b.goto(&format!("{base}/login")).await;
    b.wait_text("h1", "Log in").await;
    report.check(&b, &axe, "login").await;
    // axe-core is live: a field without a label, added to the page, is a violation.
    b.client
        .execute(
            r#"document.querySelector("main").insertAdjacentHTML("beforeend", "<input type=text id=canary>"); return null"#,
            vec![],
        )
        .await
        .unwrap();
    let canary = b.axe(&axe).await;
    assert!(
        canary.violations.iter().any(|v| v["id"] == "label"),
        "axe-core reports a field without a label: {}",
        describe_violations(&canary.violations)
    );
    b.goto(&format!("{base}/login")).await;
    b.type_into("#token", "kw_not-a-token").await;
    b.click("form.login button[type=submit]").await;
    b.wait_for("#token-error").await;
    report.check(&b, &axe, "login: a refused token").await;

    // Model keys with no key saved.
    b.login_with_token(&base, &token).await;
    report.check(&b, &axe, "model keys: empty").await;

    // A key of the wrong format: the error is tied to its field.
    b.type_into("#key-openai", "not-a-key-at-all").await;
    b.click("#provider-openai form.save button[type=submit]").await;
    let err = b.wait_text("#msg-openai-key", "Key not saved.").await;
    let field = b.find("#key-openai").await;
    assert_eq!(field.attr("aria-invalid").await.unwrap().as_deref(), Some("true"));
    let described: Vec<String> = field
        .attr("aria-describedby")
        .await
        .unwrap()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let error_id = b.find("#msg-openai-key .msg.err").await.attr("id").await.unwrap();
    let tied = match &error_id {
        Some(id) if described.contains(id) && b.text(&format!("#{id}")).await == err => None,
        _ => Some(format!(
            "the key field's aria-describedby {described:?} does not name its error's id {error_id:?}"
        )),
    };
    report.check(&b, &axe, "model keys: an invalid key format").await;

    // Saved keys, one tested, one on My key.
    let keys: Vec<(&str, String)> = PROVIDERS.iter().map(|p| (*p, key_for(p))).collect();
    for (p, k) in &keys {
        fake.set_key(provider(p), k, Behaviour::Ok);
        save_key(&kw, &token, &acc, p, k).await;
    }
    set_source(&kw, &token, &acc, "openai", "own").await;
    b.goto(&format!("{base}{SETTINGS}")).await;
    b.click("#provider-anthropic form[data-enhance=test] button").await;
    b.wait_text("#msg-anthropic-test", "Key works.").await;
    report.check(&b, &axe, "model keys: saved keys, a test passed").await;

    // A key whose calls fail: the card's warning.
    let call = json!({"provider": "openai", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "feature": "drafting"});
    fake.set_key(Provider::OpenAi, &keys[1].1, Behaviour::NoCredit);
    let failed = kw
        .http()
        .post(&format!("/v1/accounts/{acc}/ai/messages"), Some(&token), &call)
        .await;
    assert!(!failed.is_success(), "{failed}");
    // And a key its provider reported as leaked.
    fake.set_key(Provider::Google, &keys[2].1, Behaviour::Leaked);
    b.goto(&format!("{base}{SETTINGS}")).await;
    b.click("#provider-google form[data-enhance=test] button").await;
    b.wait_text("#msg-google-test", "Test failed.").await;
    b.goto(&format!("{base}{SETTINGS}")).await;
    b.wait_for("#failing-openai").await;
    b.wait_for("#leaked-google").await;
    report
        .check(&b, &axe, "model keys: failing key's warning, leaked key")
        .await;

    // Activity: events, no match, a filter that cannot be used.
    b.click("#activity-link").await;
    b.wait_text("h1", "Activity").await;
    b.wait_for("#events tbody tr").await;
    report.check(&b, &axe, "activity: events").await;
    b.goto(&format!("{base}{SETTINGS}/activity?account={acc}&last4=zzzz"))
        .await;
    b.wait_for("#activity-empty").await;
    report.check(&b, &axe, "activity: no matching events").await;
    b.goto(&format!("{base}{SETTINGS}/activity?account={acc}&month=2025-13"))
        .await;
    b.wait_for("#activity-error").await;
    report.check(&b, &axe, "activity: a filter error").await;

    // An error page: an account that is not there.
    b.goto(&format!("{base}{SETTINGS}?account=acc_nothere")).await;
    b.wait_text("h1", "Page not found").await;
    report.check(&b, &axe, "404 page").await;

    // Another error page: a form without this page's CSRF token is refused.
    b.goto(&format!("{base}{SETTINGS}")).await;
    b.client
        .execute(
            r#"var f = document.createElement("form"); f.method = "post"; f.action = "/logout";
document.body.appendChild(f); f.submit(); return null"#,
            vec![],
        )
        .await
        .unwrap();
    b.wait_text("h1", "This form was refused").await;
    report.check(&b, &axe, "403 page (a form without its CSRF token)").await;

    // Logged out: the login page says so.
    b.goto(&format!("{base}{SETTINGS}")).await;
    b.logout().await;
    b.wait_for("#login-notice").await;
    report.check(&b, &axe, "login: logged-out notice").await;

    // A member (view only, with the account switcher), and an account on the Free plan.
    let mo = create_user(&kw, "mo@example.com");
    add_member(&kw, &acc, &mo.email, "member");
    let free = create_account(&kw, "Freebie", "free", &mo.email);
    b.login_with_token(&base, &mo.token).await;
    b.goto(&format!("{base}{SETTINGS}?account={acc}")).await;
    b.wait_text(".notice.info", "View only.").await;
    b.wait_for("select#account").await;
    report.check(&b, &axe, "model keys: a member's view only").await;
    b.goto(&format!("{base}{SETTINGS}?account={free}")).await;
    b.wait_for("#plan-note").await;
    report.check(&b, &axe, "model keys: the Free plan").await;

    b.close().await;
    report.finish();
    assert_eq!(tied, None, "the key field's error is tied to the field");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_keys_page_works_from_the_keyboard() {
    use fantoccini::key::Key;
    let Some(b) = Browser::start("the_model_keys_page_works_from_the_keyboard", true).await else {
        return;
    };
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    let (token, acc) = (kw.owner_token().to_owned(), kw.owner_account().to_owned());
    let saved = key_for("anthropic");
    fake.set_key(Provider::Anthropic, &saved, Behaviour::Ok);
    save_key(&kw, &token, &acc, "anthropic", &saved).await;
    b.login_with_token(kw.base_url(), &token).await;

    // Tab from the top: the skip link first, then every control in reading order, each
    // with a visible focus indicator.
    let order = b.tab_order().await;
    eprintln!("tab order:\n  {}", order.join("\n  "));
    assert!(order[0].contains("Skip to main content"), "{order:?}");
    let at = |needle: &str| {
        order
            .iter()
            .position(|w| w.starts_with("provider-anthropic: ") && w.contains(needle))
            .unwrap_or_else(|| panic!("{needle} is not reached with Tab: {order:#?}"))
    };
    let sequence = [
        at("input#key-anthropic"),
        at("\"Save new key\""),
        at("[value=shared]"),
        at("[value=own]"),
        at("\"Test key\""),
        at("summary \"Remove\""),
    ];
    assert!(
        sequence.windows(2).all(|w| w[0] < w[1]),
        "key field, Save, source, Test key, Remove: {sequence:?} in {order:#?}"
    );

    // The CSS gives every control a focus style.
    let css = keyward_testkit::reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/assets/keyward.css", kw.base_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(css.contains(":focus-visible"), "a focus style in keyward.css");

    // The skip link moves the focus to the main content.
    b.goto(&format!("{}{SETTINGS}", kw.base_url())).await;
    b.press(Key::Tab).await;
    b.press(Key::Enter).await;
    let (what, _) = b.focused().await;
    assert!(
        what.starts_with("main#main "),
        "the skip link reaches the main content: {what}"
    );

    // Save with Enter: type a key into the field, Tab to Save, press Enter.
    let new = key_for("anthropic");
    fake.set_key(Provider::Anthropic, &new, Behaviour::Ok);
    b.find("#key-anthropic").await.click().await.unwrap();
    b.type_into("#key-anthropic", &new).await;
    b.press(Key::Tab).await;
    assert!(
        b.focused().await.0.contains("\"Save new key\""),
        "{:?}",
        b.focused().await
    );
    // What the focus looks like: target/screenshots/keyboard-focus.png (the card, Save focused).
    let dir = screenshot_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let card = b.find("#provider-anthropic").await.screenshot().await.unwrap();
    std::fs::write(dir.join("keyboard-focus.png"), card).unwrap();
    b.press(Key::Enter).await;
    b.wait_text("#msg-anthropic-key", "Key replaced.").await;
    assert_eq!(
        list_keys(&kw, &token, &acc).await["anthropic"]["key"]["last4"],
        last4(&new)
    );

    // Remove opens with Enter, its confirmation is the next stop, and Enter removes.
    b.client
        .execute(
            r##"document.querySelector("#provider-anthropic details.remove summary").focus(); return null"##,
            vec![],
        )
        .await
        .unwrap();
    b.press(Key::Enter).await;
    assert!(
        b.find("#provider-anthropic details.remove")
            .await
            .attr("open")
            .await
            .unwrap()
            .is_some(),
        "Enter opens the confirmation"
    );
    b.press(Key::Tab).await;
    let (what, shown) = b.focused().await;
    assert!(what.contains("\"Yes, remove key\"") && shown, "{what}");
    b.press(Key::Enter).await;
    b.wait_text("#msg-anthropic-remove", "Key removed.").await;
    assert!(list_keys(&kw, &token, &acc).await["anthropic"]["key"].is_null());

    // The activity page: the filters, the CSV link and the table (a scrollable region) are
    // all Tab stops, in reading order; a filter is applied with Enter.
    b.click("#activity-link").await;
    b.wait_for("#events tbody tr").await;
    let order = b.tab_order().await;
    eprintln!("activity tab order:\n  {}", order.join("\n  "));
    let at = |needle: &str| {
        order
            .iter()
            .position(|w| w.contains(needle))
            .unwrap_or_else(|| panic!("{needle} is not reached with Tab: {order:#?}"))
    };
    let sequence = [
        at("select#f-provider"),
        at("select#f-source"),
        at("input#f-last4"),
        at("input#f-month"),
        at("button \"Filter\""),
        at("a#csv-link"),
        at("div \"Events, newest first"),
    ];
    assert!(
        sequence.windows(2).all(|w| w[0] < w[1]),
        "filters, CSV, the table: {sequence:?} in {order:#?}"
    );
    b.client
        .execute(r#"document.getElementById("f-last4").focus(); return null"#, vec![])
        .await
        .unwrap();
    b.type_into("#f-last4", "zzzz").await;
    b.press(Key::Enter).await;
    b.wait_text("#activity-empty", "No events match these filters").await;
    b.close().await;
}
