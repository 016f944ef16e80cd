//! `keyward demo`: keyward with the built-in fake providers on loopback, wired and ready.
//!
//! The fakes (`keyward-fakes`, in this process) accept any well-formed key, steered by marker
//! words in it; keyward's provider base URLs point at them whatever the configuration says,
//! so the demo never talks to a real provider. The shared pool gets a key for every provider,
//! so the owner's account can call AI at once. Every page says it is a demo. What a person
//! needs (login URL, token, account, snippets for curl and each SDK) is printed once keyward
//! listens; the data lives in a temporary directory removed at exit unless `--data-dir`.

use std::io::Write;
use std::net::SocketAddr;

use keyward_core::{Catalogue, Provider};
use keyward_fakes::{Behaviour, FakeProviders};
use keyward_server::config::DatabaseUrl;
use keyward_server::runtime::{prepare_data_dir, RuntimeError};
use keyward_server::serve::{serve_with, Ready, ServeExtras};
use keyward_server::workers::WorkerCommand;
use keyward_server::Config;

/// The banner at the top of every page.
pub const BANNER: &str = "Demo: keyward is talking to built-in fake providers on this machine. \
No real Anthropic, OpenAI or Google service is ever called, and any well-formed key works.";

/// The shared pool's keys (the fakes take any well-formed key).
const POOL_KEYS: [(Provider, &str); 3] = [
    (Provider::Anthropic, "sk-ant-api03-keyward-demo-shared-pool-0001"),
    (Provider::OpenAi, "sk-proj-keyward-demo-shared-pool-0001"),
    (Provider::Google, "AQ.Ab8RN6keyward-demo-shared-pool-0001"),
];

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs the demo until SIGINT or SIGTERM. `keep_data`: the data directory was given
/// (`--data-dir`) and is kept; otherwise a temporary one is made and removed at exit.
pub async fn run(mut config: Config, listen: SocketAddr, keep_data: bool) -> Result<(), RuntimeError> {
    let fakes = FakeProviders::start().map_err(|e| RuntimeError::Other(format!("fake providers: {e}")))?;
    fakes.accept_any_key(true);
    let temp = if keep_data {
        None
    } else {
        let dir = tempfile::Builder::new()
            .prefix("keyward-demo-")
            .tempdir()
            .map_err(|e| RuntimeError::Other(format!("temporary data directory: {e}")))?;
        config.data_dir = dir.path().to_path_buf();
        Some(dir)
    };
    // Whatever the environment says: embedded SQLite, the local KEK, the fakes.
    config.database.url = Some(DatabaseUrl::sqlite_in(&config.data_dir));
    config.kek = keyward_crypto::KekSpec::local();
    config.listen = listen;
    let fake_url = fakes.base_url();
    config.set_base_urls(&fake_url);
    // A demo runs as whoever starts it, on throwaway keys for fake providers: one OS user
    // is what it is for (`serve` refuses that without KEYWARD_ALLOW_SAME_USER=1).
    config.allow_same_user = true;
    config.worker.sockets.clear();

    prepare_data_dir(&config)?;
    let store = keyward_server::runtime::open_store(&config).await?;
    let sealer = keyward_server::runtime::load_sealer(&config)?;
    for (provider, key) in POOL_KEYS {
        fakes.set_key(provider, key, Behaviour::Ok);
        keyward_server::admin::set_shared_key(
            store.as_ref(),
            &sealer,
            &keyward_server::clock::SystemClock,
            provider.as_str(),
            key,
        )
        .await?;
    }
    drop(store);

    let catalogue = keyward_server::catalogue_ops::load(&config)?;
    let data_note = match &temp {
        Some(dir) => format!("{} (removed when the demo stops)", dir.path().display()),
        None => format!("{} (kept)", config.data_dir.display()),
    };
    let worker = WorkerCommand::new(
        std::env::current_exe().map_err(|e| RuntimeError::Other(e.to_string()))?,
        &config,
    );
    let extras = ServeExtras {
        banner: Some(BANNER.to_owned()),
        on_ready: Some(Box::new(move |ready: &Ready<'_>| {
            print_guide(ready, &fake_url, &catalogue, &data_note);
        })),
        prepared_as_root: false,
        secrets: None,
    };
    let served = serve_with(config, worker, extras).await;
    drop(fakes);
    drop(temp);
    served
}

/// The default chat model of `provider`, for the snippets.
fn model(catalogue: &Catalogue, provider: Provider) -> String {
    catalogue
        .default_model(provider)
        .map(|m| m.id.clone())
        .unwrap_or_default()
}

fn print_guide(ready: &Ready<'_>, fake_url: &str, catalogue: &Catalogue, data_note: &str) {
    let url = &ready.base_url;
    say(&format!(
        "keyward demo: no real provider is ever called: fake Anthropic, OpenAI and Google answer on {fake_url} (loopback)."
    ));
    say(&format!("keyward demo: data in {data_note}."));
    let Some(first) = &ready.first_start else {
        say("keyward demo: this data directory was used before: log in with the token printed at its first start.");
        say("--- end ---");
        return;
    };
    let (token, account) = (first.token, first.account_id.as_str());
    say(&format!(
        "keyward demo: settings page (one-time login link): {}",
        first.login_url
    ));
    say(&format!("keyward demo: token {token}  account {account}"));
    let base = |p: &str| format!("{url}/v1/accounts/{account}/providers/{p}");
    let (a, o, g) = (
        model(catalogue, Provider::Anthropic),
        model(catalogue, Provider::OpenAi),
        model(catalogue, Provider::Google),
    );
    let markers: String = Behaviour::MARKERS
        .iter()
        .map(|(word, what)| format!("  {word:<12} {what}\n"))
        .collect();
    say(&format!(
        r#"
--- shell ---
export KEYWARD_URL={url} KEYWARD_TOKEN={token} KEYWARD_ACCOUNT={account}
# An AI call on the shared pool (plain; add "stream": true for server-sent events):
curl -s "$KEYWARD_URL/v1/accounts/$KEYWARD_ACCOUNT/ai/messages" -H "authorization: Bearer $KEYWARD_TOKEN" -H 'content-type: application/json' -d '{{"provider": "openai", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 50}}'
# Your own key: save it, test it, switch to it (any well-formed key works here):
curl -s -X PUT "$KEYWARD_URL/v1/accounts/$KEYWARD_ACCOUNT/model-keys/openai" -H "authorization: Bearer $KEYWARD_TOKEN" -H 'content-type: application/json' -d '{{"api_key": "sk-proj-my-own-demo-key-0001"}}'
curl -s -X POST "$KEYWARD_URL/v1/accounts/$KEYWARD_ACCOUNT/model-keys/openai/test" -H "authorization: Bearer $KEYWARD_TOKEN"
curl -s -X PUT "$KEYWARD_URL/v1/accounts/$KEYWARD_ACCOUNT/model-keys/openai/source" -H "authorization: Bearer $KEYWARD_TOKEN" -H 'content-type: application/json' -d '{{"source": "own"}}'
--- python: openai ---
from openai import OpenAI
client = OpenAI(base_url="{openai}/v1", api_key="{token}")
print(client.chat.completions.create(model="{o}", messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)
--- python: anthropic ---
import anthropic
client = anthropic.Anthropic(base_url="{anthropic}", api_key="{token}")
print(client.messages.create(model="{a}", max_tokens=50, messages=[{{"role": "user", "content": "Hello"}}]).content[0].text)
--- python: google-genai ---
from google import genai
client = genai.Client(api_key="{token}", http_options={{"base_url": "{google}"}})
print(client.models.generate_content(model="{g}", contents="Hello").text)
--- keys ---
Any well-formed key works (sk-ant-…, sk-proj-…, AQ.…; Google refuses standard AIza… keys, as it does
today). A word inside the key steers the fake provider, e.g. sk-proj-my-leaked-key-0001 or AQ.my-nocredit-demo-key-01:
{markers}To play a model's retirement at the fake: curl -s -X POST {fake_url}/_fake/models -d '{{"provider": "openai", "model": "gpt-6-luna", "available": false}}'
--- end ---
Ctrl-C stops the demo."#,
        openai = base("openai"),
        anthropic = base("anthropic"),
        google = base("google"),
    ));
}
