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
