//! The CLI as an operator meets it: its messages, exit codes and help.

use crate::common::*;

#[test]
fn a_second_user_with_the_same_email_is_refused_in_one_sentence() {
    let kw = start();
    create_user(&kw, "twice@example.com");
    let out = kw.cli(&["admin", "create-user", "--email", "twice@example.com"]);
    assert!(!out.success(), "{out}");
    assert_eq!(out.stderr.matches("already exists").count(), 1, "{out}");
    assert!(
        out.stderr
            .contains("a user with email twice@example.com already exists"),
        "{out}"
    );
    assert!(out.stdout.trim().is_empty(), "{out}");
}

/// Runs the binary with `args` in `dir`, with no KEYWARD_* setting from the test runner.
fn run_in(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("KEYWARD_") {
            cmd.env_remove(&k);
        }
    }
    cmd.current_dir(dir).args(args).output().unwrap()
}

#[test]
fn admin_in_an_empty_directory_creates_nothing_unless_told_to() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["admin", "create-user", "--email", "a@example.com"][..],
        &["audit", "verify"],
        &["kek", "status"],
        &["catalogue", "check"],
    ] {
        let out = run_in(dir.path(), args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("does not exist") && stderr.contains("--init"),
            "{args:?}: {stderr}"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "{args:?} created something"
        );
    }
    // --data-dir names it; --init creates it.
    let target = dir.path().join("vault");
    let data_dir = target.to_string_lossy().into_owned();
    let out = run_in(
        dir.path(),
        &[
            "--data-dir",
            &data_dir,
            "admin",
            "create-user",
            "--email",
            "a@example.com",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(!target.exists());
    let out = run_in(
        dir.path(),
        &[
            "--data-dir",
            &data_dir,
            "--init",
            "admin",
            "create-user",
            "--email",
            "a@example.com",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(target.join("keyward.db").is_file());
    // The flag wins over KEYWARD_DATA_DIR, and a later command finds the user there.
    let out = std::process::Command::new(bin())
        .env("KEYWARD_DATA_DIR", dir.path().join("elsewhere"))
        .args([
            "--data-dir",
            &data_dir,
            "admin",
            "create-user",
            "--email",
            "a@example.com",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{out:?}"
    );
}

#[test]
fn help_goes_to_stdout_describes_every_option_and_lists_values() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(dir.path(), &["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.stderr.is_empty(), "help goes to stdout");
    for needle in ["demo", "--data-dir", "--init", "Exit codes:", "catalogue"] {
        assert!(help.contains(needle), "{needle} in:\n{help}");
    }
    let out = run_in(dir.path(), &["admin", "create-account", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("[possible values: free, pro, business]"), "{help}");
    // Every option has a description: no option line stands alone.
    for cmd in [
        &["admin", "add-member", "--help"][..],
        &["admin", "set-plan", "--help"],
        &["catalogue", "check", "--help"],
        &["kek", "retire", "--help"],
        &["demo", "--help"],
    ] {
        let out = run_in(dir.path(), cmd);
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        let options: Vec<&str> = help
            .lines()
            .filter(|l| l.trim_start().starts_with("--") && !l.contains("--help"))
            .collect();
        assert!(!options.is_empty(), "{cmd:?}");
        for line in options {
            let described = line.split("  ").filter(|p| !p.trim().is_empty()).count() >= 2;
            assert!(described, "{cmd:?}: option without a description: {line:?}\n{help}");
        }
    }
    assert_eq!(
        run_in(
            dir.path(),
            &["admin", "set-plan", "--plan", "gold", "--account", "acc_x"]
        )
        .status
        .code(),
        Some(2)
    );
}

#[tokio::test]
async fn metrics_can_be_served_on_an_address_of_their_own() {
    let kw = start_with(keyward_testkit::Options::default().env("KEYWARD_METRICS_LISTEN", "127.0.0.1:0"));
    let line = kw
        .stdout()
        .lines()
        .find_map(|l| l.strip_prefix("keyward: metrics on ").map(str::to_owned))
        .expect("the metrics address is printed");
    // The API's listener no longer answers /metrics; the internal one does.
    assert_eq!(kw.http().get("/metrics", None).await.status, 404);
    let body = keyward_testkit::reqwest::get(&line)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.contains("# TYPE keyward_http_request_duration_seconds histogram"),
        "{body}"
    );
    assert!(body.contains("process_resident_memory_bytes"), "{body}");
}
