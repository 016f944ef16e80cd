//! The activity page and its CSV through the real binary (`cargo bench -p keyward --bench
//! activity`): `keyward serve` on a temp dir, 10,000 `ai.request` events appended to the
//! owner's account with the store (the same chain key), a session made through `/login`,
//! then timed HTTP GETs over loopback:
//! - the activity page (its newest 50 events; the answer includes checking the account's
//!   whole audit chain, which is 10,002 events here);
//! - the CSV of all 10,000+ events;
//! - the CSV with a filter that matches a third of them.
//!
//! Each is run `RUNS` times after one warm-up; the median and the slowest are printed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "a benchmark: it prints its figures"
)]

use std::path::Path;
use std::time::{Duration, Instant};

use keyward_core::{AccountId, KeySource, Last4, Provider, UnixMillis};
use keyward_crypto::AuditChainKey;
use keyward_store::sqlite::SqliteOptions;
use keyward_store::{AuditAction, AuditActor, NewAuditEvent, SqliteStore, Store};
use keyward_testkit::http::RawRequest;
use keyward_testkit::reqwest::Method;
use keyward_testkit::{Keyward, Options};

const EVENTS: usize = 10_000;
const RUNS: usize = 15;

fn cookie_pair(r: &keyward_testkit::Resp, name: &str) -> String {
    r.headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.split(';').next().filter(|p| p.starts_with(&format!("{name}="))))
        .unwrap()
        .to_owned()
}

fn csrf_of(html: &str) -> String {
    let at = html.find(r#"name="csrf" value=""#).unwrap() + r#"name="csrf" value=""#.len();
    html[at..at + html[at..].find('"').unwrap()].to_owned()
}

async fn seed(data_dir: &Path, account: &str) {
    let store = SqliteStore::open_file(
        &data_dir.join("keyward.db"),
        AuditChainKey::load(data_dir).unwrap(),
        SqliteOptions::default(),
    )
    .await
    .unwrap();
    let account = AccountId::parse(account).unwrap();
    let now = UnixMillis(time_now());
    let actor = AuditActor("cli".to_owned());
    let providers = [Provider::Anthropic, Provider::OpenAi, Provider::Google];
    let mut batch = Vec::new();
    for i in 0..EVENTS {
        let p = providers[i % 3];
        let own = i % 2 == 0;
        let e = NewAuditEvent::new(
            &account,
            UnixMillis(now.as_i64() - (EVENTS - i) as i64 * 1000),
            &actor,
            AuditAction::AiRequest,
            p,
        )
        .key_source(if own { KeySource::Own } else { KeySource::Shared })
        .last4(own.then(|| Last4::from_stored("ab1c").unwrap()).as_ref())
        .model("gpt-6-luna")
        .tokens(120 + i as u64 % 50, 300)
        .request_id(Some(format!("req_{i:08}")))
        .feature(Some("drafting".to_owned()));
        batch.push(e);
        if batch.len() == 500 {
            store.append_audit(&batch).await.unwrap();
            batch.clear();
        }
    }
    store.append_audit(&batch).await.unwrap();
}

#[allow(clippy::disallowed_methods, reason = "a benchmark's own clock")]
fn time_now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

async fn timed(kw: &Keyward, cookie: &str, path: &str, check: impl Fn(&str)) -> (Duration, Duration, usize) {
    let get = || {
        kw.http()
            .raw(RawRequest::new(Method::GET, path).header("cookie", cookie))
    };
    let warm = get().await;
    assert_eq!(warm.status, 200, "{path}: {warm}");
    check(&warm.text);
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let t = Instant::now();
        let r = get().await;
        times.push(t.elapsed());
        assert_eq!(r.status, 200);
    }
    times.sort();
    (times[RUNS / 2], times[RUNS - 1], warm.text.len())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let kw = Keyward::start(Path::new(env!("CARGO_BIN_EXE_keyward")), Options::default().log("warn"));
    let (token, account) = (kw.owner_token().to_owned(), kw.owner_account().to_owned());
    seed(kw.data_dir(), &account).await;

    let form = kw.http().get("/login", None).await;
    let login_cookie = cookie_pair(&form, "keyward_login");
    let body = format!("csrf={}&token={token}", csrf_of(&form.text));
    let r = kw
        .http()
        .raw(
            RawRequest::new(Method::POST, "/login")
                .header("cookie", &login_cookie)
                .content_type("application/x-www-form-urlencoded")
                .body(body),
        )
        .await;
    let cookie = cookie_pair(&r, "keyward_session");

    let base = "/settings/ai/model-keys";
    let rows = |n: usize| move |t: &str| assert_eq!(t.matches("<tr data-event=").count(), n, "rows");
    let lines = |n: usize| move |t: &str| assert_eq!(t.lines().count(), n + 1, "CSV lines");
    let (p50, pmax, size) = timed(&kw, &cookie, &format!("{base}/activity?account={account}"), rows(50)).await;
    println!("activity page, 50 of {EVENTS} events (chain of {EVENTS} checked): median {p50:?}, slowest {pmax:?} ({size} bytes)");
    let (p50, pmax, size) = timed(
        &kw,
        &cookie,
        &format!("{base}/activity?account={account}&provider=openai&page=20"),
        rows(50),
    )
    .await;
    println!("activity page 20, provider=openai: median {p50:?}, slowest {pmax:?} ({size} bytes)");
    let (p50, pmax, size) = timed(
        &kw,
        &cookie,
        &format!("{base}/activity.csv?account={account}"),
        lines(EVENTS),
    )
    .await;
    println!("CSV of all {EVENTS} events: median {p50:?}, slowest {pmax:?} ({size} bytes)");
    let (p50, pmax, size) = timed(
        &kw,
        &cookie,
        &format!("{base}/activity.csv?account={account}&provider=openai"),
        lines(EVENTS / 3),
    )
    .await;
    println!(
        "CSV filtered to provider=openai ({} events): median {p50:?}, slowest {pmax:?} ({size} bytes)",
        EVENTS / 3
    );
}
