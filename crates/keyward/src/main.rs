//! The `keyward` binary: parses the command line and hands each command to the crate
//! that owns it. The only place `anyhow` is used, and the only place the process
//! environment is read (into `Config`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keyward_crypto::AuditChainKey;
use keyward_server::audit_ops::{self, Verdict};
use keyward_server::clock::SystemClock;
use keyward_server::runtime::{open_store, prepare_data_dir};
use keyward_server::workers::WorkerCommand;
use keyward_server::{admin, logging, process_guard, serve, users, Config};

mod demo;
mod zero_on_free;

/// Every block the binary frees is zeroed first, so a key that passed through a buffer
/// (hyper's, serde's, a grown `Vec`) does not stay in freed memory: see `zero_on_free` for
/// why and what it costs.
#[global_allocator]
static ALLOCATOR: zero_on_free::ZeroOnFree<std::alloc::System> = zero_on_free::ZeroOnFree::new(std::alloc::System);

/// What every command's exit code means (shown at the end of `--help`).
const EXIT_CODES: &str = "Exit codes:
  0  success
  1  an error (the message says which), or a check that found a problem:
     `audit verify` a broken chain, `catalogue check` a model the provider no longer lists,
     `kek rewrap` a key that could not be moved
  2  the command line is wrong, the data directory does not exist (see --init), or
     `catalogue check` could not ask a provider

Settings come from KEYWARD_* environment variables (and --config); see the README's
Configuration section. Data-changing commands print JSON on stdout; messages go to stderr.";

#[derive(Parser)]
#[command(
    name = "keyward",
    version,
    about = "Bring-your-own-key vault and gateway for AI model keys",
    after_help = EXIT_CODES
)]
struct Cli {
    /// A TOML file of settings (environment variables win over it).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The data directory (SQLite database, key-encryption keys, audit-chain key); wins over
    /// KEYWARD_DATA_DIR. Default: ./keyward-data.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Create the data directory when it does not exist (admin, audit, kek and catalogue
    /// check otherwise refuse to start on a missing one, so a typo cannot open a new, empty vault).
    #[arg(long, global = true)]
    init: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API and the settings page (on first start, create the owner and print
    /// their token and a one-time login URL).
    Serve,
    /// Try keyward with nothing else installed: keyward with built-in fake Anthropic, OpenAI
    /// and Google on loopback (no real provider is ever called), printing the login URL, a
    /// token and copy-paste snippets for curl and each provider's SDK.
    Demo {
        /// Where keyward listens (port 0: any free port, printed).
        #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
        listen: std::net::SocketAddr,
    },
    /// The isolated worker that opens keys. `serve` starts its own; `--listen SOCKET` runs
    /// one as its own service (its own OS user and configuration), which accepts only
    /// KEYWARD_WORKER_GATEWAY_USER; `serve` then connects with KEYWARD_WORKER_SOCKETS.
    Worker {
        /// Serve on this Unix socket as a service of its own.
        #[arg(long, value_name = "SOCKET")]
        listen: Option<PathBuf>,
    },
    /// Started by a root-started `serve` as KEYWARD_WORKER_USER: starts and restarts its workers.
    #[command(hide = true)]
    WorkerSupervisor,
    /// Applies the worker sandbox and tries something it must stop (for tests).
    #[command(hide = true)]
    WorkerSelftest {
        /// `write`, `exec`, `fork`, `ptrace`, `process_vm_readv`, `raw_socket`, `thread` or `resolve`.
        probe: String,
    },
    /// Users, accounts, memberships, plans and the shared pool's keys.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// The tamper-evident audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Key-encryption-key versions: status, rotate, promote, rewrap, retire.
    Kek {
        #[command(subcommand)]
        command: KekCommand,
    },
    /// The model catalogue: show it, or check it against what the providers list today.
    Catalogue {
        #[command(subcommand)]
        command: CatalogueCommand,
    },
    /// The webhook outbox: list events and their delivery, send one again.
    Webhooks {
        #[command(subcommand)]
        command: WebhooksCommand,
    },
}

#[derive(Subcommand)]
enum WebhooksCommand {
    /// Print events as JSON lines, newest first: type, account, status (delivered, pending,
    /// dead), attempts, last error and payload.
    List {
        /// Only events not delivered after at least one attempt (retrying or dead).
        #[arg(long)]
        failed: bool,
        /// At most this many.
        #[arg(long, default_value_t = 100, value_name = "N")]
        limit: u32,
    },
    /// Send an event again from scratch (a dead one, or one a receiver lost), to every endpoint.
    Replay {
        /// Its webhook-id (msg_…), as `list` shows it.
        event_id: String,
    },
}

#[derive(Subcommand)]
enum CatalogueCommand {
    /// Print the catalogue in force (built in, or KEYWARD_CATALOGUE) as JSON.
    Show,
    /// Ask each provider's model listing (through a worker, with the platform's shared key)
    /// and name every catalogued model it no longer lists. Exit 0: every active and probe
    /// model is listed; 1: one is gone; 2: a provider could not be asked.
    Check {
        /// Check one provider only.
        #[arg(long, value_parser = ["anthropic", "openai", "google"])]
        provider: Option<String>,
    },
}

#[derive(Subcommand)]
enum KekCommand {
    /// The primary version, every version's files, saved keys per version, re-wrap progress.
    Status,
    /// Create a new KEK version and make it primary (new keys are sealed to it).
    Rotate {
        /// Create the version without making it primary (several nodes: copy it to every
        /// node first, then `promote`).
        #[arg(long)]
        staged: bool,
        /// AWS KMS: the credentials file (0600) allowed `kms:CreateKey`; default: the
        /// worker's file.
        #[arg(long, value_name = "FILE")]
        credentials_file: Option<std::path::PathBuf>,
    },
    /// Make a staged version primary.
    Promote {
        /// The version to make primary (a number, as `kek status` lists them).
        #[arg(long)]
        version: u32,
    },
    /// Move every saved key to the primary version (in a worker; resumable).
    Rewrap {
        /// Keys per batch (one progress line each).
        #[arg(long, default_value_t = 100)]
        batch: u32,
        /// Pause after each batch, in milliseconds (for tests).
        #[arg(long, default_value_t = 0, hide = true)]
        pause_ms: u64,
    },
    /// Destroy a version no saved key uses any more (never the primary).
    Retire {
        /// The version to destroy.
        #[arg(long)]
        version: u32,
        /// AWS KMS: the credentials file (0600) allowed `kms:DisableKey` and
        /// `kms:ScheduleKeyDeletion`; default: the worker's file.
        #[arg(long, value_name = "FILE")]
        credentials_file: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create a user; prints the user id and a token (shown once).
    CreateUser {
        /// The user's e-mail address (unique).
        #[arg(long)]
        email: String,
    },
    /// Create an account owned by an existing user.
    CreateAccount {
        /// The account's name, as people read it.
        #[arg(long)]
        name: String,
        /// The plan: free (shared pool only), pro or business (own keys allowed).
        #[arg(long, value_parser = ["free", "pro", "business"])]
        plan: String,
        /// The e-mail address of the user who owns it (create them first).
        #[arg(long, value_name = "EMAIL")]
        owner: String,
    },
    /// Add a user to an account, or change their role.
    AddMember {
        /// The account id (acc_…).
        #[arg(long, value_name = "ACCOUNT_ID")]
        account: String,
        /// The user's e-mail address.
        #[arg(long)]
        email: String,
        /// owner and admin manage keys; member only uses AI.
        #[arg(long, value_parser = ["owner", "admin", "member"])]
        role: String,
    },
    /// Set the platform's shared-pool key for a provider, read from standard input (never
    /// from the command line).
    SetSharedKey {
        /// Whose key it is.
        #[arg(long, value_parser = ["anthropic", "openai", "google"])]
        provider: String,
    },
    /// Create a service of the product (drafting, Autopilot, provisioning…) with scopes;
    /// prints its id and a kws_ token (shown once).
    CreateService {
        /// Its name, as the audit log shows it (service:NAME): 1 to 64 of a-z, 0-9, _ and -.
        #[arg(long)]
        name: String,
        /// ai:call (AI calls and the pass-through, any account), accounts:manage (the
        /// provisioning API), audit:read (any account's audit log). Repeat for several. No
        /// scope manages keys.
        #[arg(long = "scope", value_name = "SCOPE", required = true, value_parser = ["ai:call", "accounts:manage", "audit:read"])]
        scopes: Vec<String>,
    },
    /// List the services (never their tokens).
    ListServices,
    /// Revoke a service's token: refused from the next request on, on every node.
    RevokeService {
        /// The service's name.
        #[arg(long)]
        name: String,
    },
    /// Change an account's plan and, optionally, its monthly shared-pool credit limit.
    SetPlan {
        /// The account id (acc_…).
        #[arg(long, value_name = "ACCOUNT_ID")]
        account: String,
        /// The new plan.
        #[arg(long, value_parser = ["free", "pro", "business"])]
        plan: String,
        /// Shared-pool credits per calendar month (one credit is $0.001 of list price);
        /// default: the plan's (free 1,000, pro 20,000, business 100,000).
        #[arg(long, value_name = "CREDITS")]
        shared_credit_limit: Option<i64>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the audit chains (every account's and the platform's); exit 0 when intact, 1
    /// naming the first broken event, or with --checkpoint every chain behind the checkpoint.
    Verify {
        /// One account (acc_…); default: every account, and the platform's chain.
        #[arg(long, value_name = "ACCOUNT_ID")]
        account: Option<String>,
        /// Also check that every chain still reaches where this checkpoint (written by `audit
        /// checkpoint`, signed under KEYWARD_AUDIT_CHECKPOINT_KEY) saw it: a chain rolled back
        /// or deleted since is named.
        #[arg(long, value_name = "FILE")]
        checkpoint: Option<PathBuf>,
    },
    /// Print an account's events, or the platform's (--platform), as JSON lines, oldest first.
    Export {
        /// The account (acc_…).
        #[arg(long, value_name = "ACCOUNT_ID", required_unless_present = "platform")]
        account: Option<String>,
        /// The platform's chain: shared-pool keys, KEK rotate, promote and retire, plan changes
        /// made by the CLI.
        #[arg(long, conflicts_with = "account")]
        platform: bool,
    },
    /// Write the head of every chain (seq and MAC) with the time, signed with Ed25519 under
    /// KEYWARD_AUDIT_CHECKPOINT_KEY (created, mode 0600, on first use). Keep checkpoints
    /// where whoever can write the database cannot.
    Checkpoint {
        /// Write it to this file instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}")?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            // Help and version were asked for: they go to stdout, like any answer.
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = write!(std::io::stdout(), "{}", e.render());
                return ExitCode::SUCCESS;
            }
            // clap quotes the offending argument; if someone pasted a key into argv, it
            // must not be printed back (terminal scrollback, CI logs).
            let text = keyward_server::logging::scrub(&e.render().to_string());
            let _ = write!(std::io::stderr(), "{text}");
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "keyward: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The process environment with the command line's settings on top (flags win).
fn settings(cli: &Cli) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = std::env::vars().collect();
    if let Some(dir) = &cli.data_dir {
        vars.push(("KEYWARD_DATA_DIR".to_owned(), dir.display().to_string()));
    }
    vars
}

/// Commands that work on an existing data directory refuse a missing one unless `--init`:
/// run in the wrong directory, they would otherwise create a new, empty vault and succeed.
fn check_data_dir(cli: &Cli, config: &Config) -> Result<(), ExitCode> {
    let needs_existing = matches!(
        cli.command,
        Command::Admin { .. }
            | Command::Audit { .. }
            | Command::Kek { .. }
            | Command::Webhooks { .. }
            | Command::Catalogue {
                command: CatalogueCommand::Check { .. }
            }
    );
    if needs_existing && !cli.init && !config.data_dir.is_dir() {
        let _ = writeln!(
            std::io::stderr(),
            "keyward: error: the data directory {} does not exist. Point --data-dir (or KEYWARD_DATA_DIR) at the one \
             `keyward serve` uses, or pass --init to create a new one.",
            config.data_dir.display()
        );
        return Err(ExitCode::from(2));
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(cli.config.as_deref(), settings(&cli)).context("configuration")?;
    if let Err(code) = check_data_dir(&cli, &config) {
        return Ok(code);
    }
    logging::init(&config.log, config.log_format).map_err(anyhow::Error::msg)?;
    if let Command::WorkerSelftest { probe } = &cli.command {
        let Some(probe) = keyward_worker::sandbox::Probe::parse(probe) else {
            anyhow::bail!(
                "unknown probe {probe:?}: one of {}",
                keyward_worker::sandbox::Probe::NAMES.join(", ")
            );
        };
        return Ok(ExitCode::from(
            u8::try_from(keyward_worker::sandbox::selftest(probe)).unwrap_or(1),
        ));
    }
    if let Command::Worker { listen } = &cli.command {
        // No async runtime yet: the sandbox must be in place before any thread starts.
        let process = keyward_server::config::WorkerProcess::from_env(std::env::vars(), listen.as_deref())
            .context("configuration")?;
        return run_worker(&config, &process);
    }
    let exe = std::env::current_exe()?;
    if let Command::WorkerSupervisor = cli.command {
        let parent = std::env::vars()
            .find(|(k, _)| k == users::SUPERVISOR_PARENT_VAR)
            .and_then(|(_, v)| v.parse::<u32>().ok())
            .context("the worker supervisor is started by `keyward serve`")?;
        users::run_supervisor(Path::new(users::SELF_EXE), &config.worker.sockets, parent)?;
        return Ok(ExitCode::SUCCESS);
    }
    // Started as root with two users: everything that needs root happens here, while this
    // process is still one thread, then it drops to the gateway user for good (`users.rs`).
    let mut prepared_as_root = false;
    let mut secrets = None;
    let mut control = None;
    let mut owners_after = None;
    if let Command::Serve = cli.command {
        // No core file of a process about to read secret files as root.
        process_guard::forbid_core_dumps_and_ptrace()?;
        let plan = users::root_plan(&config)?;
        if plan.is_some() {
            // Files root may read and the gateway user may not (TLS key, webhook and
            // single sign-on secrets) are read now, before the drop.
            secrets = Some(serve::Secrets::read(&config)?);
        }
        if let Some(plan @ users::RootPlan::GatewayOnly { .. }) = &plan {
            // The workers are a service of their own: the data dir is the gateway's alone.
            std::fs::create_dir_all(&config.data_dir).context("data dir")?;
            plan.apply_ownership(&config)?;
            users::drop_to(plan.gateway())?;
            // The uid change resets dumpability: undumpable again (as below).
            process_guard::forbid_core_dumps_and_ptrace()?;
            tracing::info!(gateway = %plan.gateway().name, "the gateway dropped root; workers from KEYWARD_WORKER_SOCKETS");
        }
        if let Some(users::RootPlan::TwoUsers { gateway, worker }) = plan {
            prepare_data_dir(&config)?;
            users::apply_ownership(&config, &gateway, &worker)?;
            let sockets = users::supervised_sockets(&config);
            let env = WorkerCommand::new(exe.clone(), &config).env;
            let mut supervisor =
                users::start_supervisor(Path::new(users::SELF_EXE), &env, &sockets, &worker, &gateway)?;
            control = supervisor.stdin.take();
            users::drop_to(&gateway)?;
            // The uid change above resets the dumpable flag: the gateway makes itself
            // undumpable again (PR_SET_DUMPABLE 0, RLIMIT_CORE 0), before it serves.
            process_guard::forbid_core_dumps_and_ptrace()?;
            tracing::info!(
                gateway = %gateway.name,
                worker = %worker.name,
                supervisor = supervisor.id(),
                "two OS users: workers started as the worker user; the gateway dropped root"
            );
            config.worker.sockets = sockets;
            prepared_as_root = true;
            // The supervisor dies with this process (parent-death signal); nothing to keep.
            drop(supervisor);
        }
    } else if !matches!(cli.command, Command::Demo { .. }) && users::is_root() {
        // A command run as root on a two-user data dir gives its files back afterwards
        // (a SQLite -wal created as root would lock the gateway out).
        owners_after = users::root_plan(&config)?;
    }
    let mut worker_command = WorkerCommand::new(exe, &config);
    worker_command.control = control.map(|c| Arc::new(std::sync::Mutex::new(c)));
    let config_after = config.clone();
    let out = run_command(cli, config, worker_command, prepared_as_root, secrets);
    if let Some(plan) = owners_after {
        if config_after.data_dir.is_dir() {
            plan.apply_ownership(&config_after)?;
        }
    }
    out
}

fn run_command(
    cli: Cli,
    config: Config,
    worker_command: WorkerCommand,
    prepared_as_root: bool,
    secrets: Option<serve::Secrets>,
) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve => {
                let extras = serve::ServeExtras {
                    prepared_as_root,
                    secrets,
                    ..Default::default()
                };
                serve::serve_with(config, worker_command, extras).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Demo { listen } => {
                demo::run(config, listen, cli.data_dir.is_some()).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Worker { .. } | Command::WorkerSelftest { .. } | Command::WorkerSupervisor => {
                Ok(ExitCode::FAILURE)
            }
            Command::Admin { command } => {
                prepare_data_dir(&config)?;
                let (store, kek_store) = keyward_server::runtime::open_stores(&config).await?;
                let clock = Arc::new(SystemClock);
                let out = match command {
                    AdminCommand::CreateUser { email } => {
                        let (id, token) = admin::create_user(store.as_ref(), clock.as_ref(), &email).await?;
                        serde_json::json!({ "user_id": id, "token": token.as_str() })
                    }
                    AdminCommand::CreateAccount { name, plan, owner } => {
                        let id = admin::create_account(store.as_ref(), clock.as_ref(), &name, &plan, &owner).await?;
                        serde_json::json!({ "account_id": id })
                    }
                    AdminCommand::AddMember { account, email, role } => {
                        admin::add_member(store.as_ref(), clock.as_ref(), &account, &email, &role).await?
                    }
                    AdminCommand::SetSharedKey { provider } => {
                        let mut raw = zeroize::Zeroizing::new(String::new());
                        std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut raw)
                            .context("reading the key from standard input")?;
                        let sealer = keyward_server::runtime::load_sealer(&config)?;
                        // Counted as a sealer while it seals and stores, as a gateway is, so
                        // `kek retire` cannot destroy the version under it.
                        let node = format!("keyward admin set-shared-key pid {}", std::process::id());
                        let ids = [sealer.kek_id().to_owned()];
                        kek_store
                            .report_sealer(&node, &ids, keyward_server::clock::Clock::now(clock.as_ref()))
                            .await?;
                        let out = admin::set_shared_key(store.as_ref(), &sealer, clock.as_ref(), &provider, &raw).await;
                        kek_store.forget_sealer(&node).await?;
                        out?
                    }
                    AdminCommand::CreateService { name, scopes } => {
                        let (id, token) =
                            admin::create_service(store.as_ref(), clock.as_ref(), &name, &scopes).await?;
                        serde_json::json!({ "service_id": id, "token": token.as_str() })
                    }
                    AdminCommand::ListServices => admin::list_services(store.as_ref()).await?,
                    AdminCommand::RevokeService { name } => {
                        admin::revoke_service(store.as_ref(), clock.as_ref(), &name).await?
                    }
                    AdminCommand::SetPlan {
                        account,
                        plan,
                        shared_credit_limit,
                    } => admin::set_plan(store.as_ref(), clock.as_ref(), &account, &plan, shared_credit_limit).await?,
                };
                print_json(&out)?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Kek { command } => {
                prepare_data_dir(&config)?;
                run_kek(&config, &worker_command, command).await
            }
            Command::Catalogue { command } => {
                use keyward_server::catalogue_ops::{self, CheckVerdict};
                let catalogue = catalogue_ops::load(&config)?;
                match command {
                    CatalogueCommand::Show => {
                        print_json(&catalogue_ops::show(&catalogue))?;
                        Ok(ExitCode::SUCCESS)
                    }
                    CatalogueCommand::Check { provider } => {
                        let only = provider
                            .map(|p| p.parse::<keyward_core::Provider>())
                            .transpose()
                            .map_err(|e| anyhow::anyhow!("--provider: {e}"))?;
                        let store = open_store(&config).await?;
                        let (report, verdict) = catalogue_ops::check(
                            &catalogue,
                            store.as_ref(),
                            &worker_command,
                            &config.data_dir,
                            config.provider.timeout_ms,
                            only,
                        )
                        .await
                        .map_err(anyhow::Error::msg)?;
                        print_json(&report)?;
                        Ok(match verdict {
                            CheckVerdict::Current => ExitCode::SUCCESS,
                            CheckVerdict::ModelsGone(gone) => {
                                let _ = writeln!(
                                    std::io::stderr(),
                                    "keyward: the providers no longer list these catalogued models: {}; update the catalogue",
                                    gone.join(", ")
                                );
                                ExitCode::from(1)
                            }
                            CheckVerdict::Unchecked => {
                                let _ = writeln!(
                                    std::io::stderr(),
                                    "keyward: some providers could not be checked (see \"reason\")"
                                );
                                ExitCode::from(2)
                            }
                        })
                    }
                }
            }
            Command::Webhooks { command } => {
                let store = open_store(&config).await?;
                match command {
                    WebhooksCommand::List { failed, limit } => {
                        let mut out = std::io::stdout().lock();
                        for event in keyward_server::webhooks::list(store.as_ref(), failed, limit).await? {
                            writeln!(out, "{event}")?;
                        }
                        Ok(ExitCode::SUCCESS)
                    }
                    WebhooksCommand::Replay { event_id } => {
                        let now = keyward_server::clock::Clock::now(&SystemClock);
                        if store.replay_webhook(&event_id, now).await? {
                            print_json(&serde_json::json!({"replayed": event_id}))?;
                            Ok(ExitCode::SUCCESS)
                        } else {
                            let _ = writeln!(std::io::stderr(), "keyward: no webhook event {event_id:?}");
                            Ok(ExitCode::from(1))
                        }
                    }
                }
            }
            Command::Audit { command } => {
                let store = open_store(&config).await?;
                let key = AuditChainKey::load(&config.data_dir)?;
                let checkpoint_key = config.audit_checkpoint_key_path();
                match command {
                    AuditCommand::Verify { account, checkpoint } => {
                        let verdict = match checkpoint {
                            None => audit_ops::verify(store.as_ref(), &key, account.as_deref()).await?,
                            Some(file) => {
                                let text = std::fs::read_to_string(&file)
                                    .with_context(|| format!("reading the checkpoint {}", file.display()))?;
                                let signing = keyward_crypto::CheckpointSigningKey::load(&checkpoint_key)
                                    .context("the checkpoint key (KEYWARD_AUDIT_CHECKPOINT_KEY)")?;
                                audit_ops::verify_against_checkpoint(
                                    store.as_ref(),
                                    &key,
                                    &signing,
                                    &text,
                                    account.as_deref(),
                                )
                                .await?
                            }
                        };
                        print_json(&verdict.to_json())?;
                        let mut err = std::io::stderr();
                        match verdict {
                            Verdict::Intact { .. } => Ok(ExitCode::SUCCESS),
                            Verdict::Broken(b) => {
                                let at = b.event_id.map_or_else(
                                    || format!("seq {}", b.seq),
                                    |id| format!("event {id} (seq {})", b.seq),
                                );
                                let _ = writeln!(err, "keyward: audit chain of {} broken at {at}: {}", b.account_id, b.reason);
                                Ok(ExitCode::from(1))
                            }
                            Verdict::BehindCheckpoint(behind) => {
                                for b in behind {
                                    let _ = writeln!(err, "keyward: audit chain of {} is behind the checkpoint: {}", b.account_id, b.reason);
                                }
                                Ok(ExitCode::from(1))
                            }
                            Verdict::CheckpointRefused(reason) => {
                                let _ = writeln!(err, "keyward: checkpoint refused: {reason}");
                                Ok(ExitCode::from(1))
                            }
                        }
                    }
                    AuditCommand::Export { account, platform } => {
                        let lines = match (account, platform) {
                            (Some(account), false) => audit_ops::export(store.as_ref(), &account).await?,
                            _ => audit_ops::export_platform(store.as_ref()).await?,
                        };
                        let mut out = std::io::stdout().lock();
                        for line in lines {
                            writeln!(out, "{line}")?;
                        }
                        Ok(ExitCode::SUCCESS)
                    }
                    AuditCommand::Checkpoint { out } => {
                        let signing = keyward_crypto::CheckpointSigningKey::load_or_create(&checkpoint_key)
                            .context("the checkpoint key (KEYWARD_AUDIT_CHECKPOINT_KEY)")?;
                        let now = keyward_server::clock::Clock::now(&SystemClock);
                        let checkpoint = audit_ops::checkpoint(store.as_ref(), &signing, now).await?;
                        match out {
                            None => print_json(&checkpoint)?,
                            Some(file) => {
                                std::fs::write(&file, format!("{checkpoint}\n"))
                                    .with_context(|| format!("writing the checkpoint {}", file.display()))?;
                                let chains = checkpoint["chains"].as_array().map_or(0, Vec::len);
                                print_json(&serde_json::json!({ "checkpoint": file.display().to_string(), "chains": chains, "at": checkpoint["at"] }))?;
                            }
                        }
                        Ok(ExitCode::SUCCESS)
                    }
                }
            }
        }
    })
}

/// `keyward kek …`: each prints JSON (re-wrap: one line per batch, then a summary).
async fn run_kek(
    config: &keyward_server::Config,
    worker: &WorkerCommand,
    command: KekCommand,
) -> anyhow::Result<ExitCode> {
    use keyward_server::kek;
    let mut backend = keyward_server::runtime::kek_backend(config);
    if let KekCommand::Rotate {
        credentials_file: Some(path),
        ..
    }
    | KekCommand::Retire {
        credentials_file: Some(path),
        ..
    } = &command
    {
        // Only a backend that reads credentials of its own (AWS KMS) takes one.
        backend = backend
            .with_admin_credentials_file(path)
            .context("--credentials-file is for KEYWARD_KEK=awskms:…")?;
    }
    // The actions the platform's audit chain records: the database is opened first, so one
    // that cannot be reached stops the command before anything is done.
    let audit_store = match command {
        KekCommand::Rotate { .. } | KekCommand::Promote { .. } | KekCommand::Retire { .. } => {
            Some(open_store(config).await?)
        }
        KekCommand::Status | KekCommand::Rewrap { .. } => None,
    };
    let out = match command {
        KekCommand::Rotate { staged, .. } => kek::rotate(&backend, staged).await?,
        KekCommand::Promote { version } => kek::promote(&backend, version)?,
        KekCommand::Status => {
            let (_, kek_store) = kek::open_stores(config).await?;
            kek::status(&backend, kek_store.as_ref()).await?
        }
        KekCommand::Retire { version, .. } => {
            let (_, kek_store) = kek::open_stores(config).await?;
            let now = keyward_server::clock::Clock::now(&keyward_server::clock::SystemClock);
            kek::retire(&backend, kek_store.as_ref(), version, now).await?
        }
        KekCommand::Rewrap { batch, pause_ms } => {
            let (store, kek_store) = kek::open_stores(config).await?;
            let opts = kek::RewrapOptions {
                batch,
                pause: std::time::Duration::from_millis(pause_ms),
            };
            let done = kek::rewrap(&backend, store.as_ref(), kek_store.as_ref(), worker, &opts, |p| {
                let _ = print_json(&serde_json::json!({ "progress": p }));
            })
            .await?;
            print_json(&serde_json::json!({ "done": done }))?;
            if done.failed > 0 {
                return Ok(ExitCode::from(1));
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    print_json(&out)?;
    if let Some(store) = audit_store {
        let now = keyward_server::clock::Clock::now(&keyward_server::clock::SystemClock);
        kek::audit(store.as_ref(), &out, now).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `keyward worker`: load the KEK's opening half, then hand over to the sandboxed worker.
fn run_worker(config: &Config, process: &keyward_server::config::WorkerProcess) -> anyhow::Result<ExitCode> {
    // First of all: die with the gateway, and do not start at all if it is already gone
    // (a worker orphaned before this line would otherwise keep the KEK's private half).
    if let Some(parent) = process.parent {
        keyward_worker::sandbox::die_with_parent()?;
        if !keyward_worker::sandbox::parent_is(parent) {
            anyhow::bail!("the gateway that started this worker is gone");
        }
    }
    // Who may connect: the configured gateway uid; a service without one accepts only its
    // own user; a worker `serve` started accepts only that parent.
    let gateway_uid = match (&config.worker.gateway_user, process.parent) {
        (Some(user), _) => Some(users::resolve("KEYWARD_WORKER_GATEWAY_USER", user)?.uid),
        (None, None) => Some(users::current_uid()),
        (None, Some(_)) => None,
    };
    // Every live KEK version, read now (the private halves, the PIN or the worker's own
    // credentials): after the sandbox the data dir is out of reach, so a rotation or
    // retirement reaches a worker when the gateway restarts it.
    let keys = keyward_server::runtime::kek_backend(config).keyring()?;
    let worker_config = keyward_worker::WorkerConfig {
        socket: process.socket.clone(),
        base_urls: keyward_core::Provider::ALL
            .iter()
            .map(|&p| (p, config.base_url(p).to_owned()))
            .collect(),
        connect_timeout: std::time::Duration::from_millis(u64::from(config.provider.connect_timeout_ms)),
        threads: usize::from(config.worker.threads),
        extra_read_only: keys.sandbox_read,
        gateway_uid,
    };
    keyward_worker::run(worker_config, keys.keyring)?;
    Ok(ExitCode::SUCCESS)
}
