//! A small versioned migration runner: each backend lists its `migrations/` files in
//! order; applied versions are recorded in `keyward_migrations`, and each migration runs
//! in its own transaction with its record.

/// One schema step, compiled into the binary.
#[derive(Debug)]
pub(crate) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

pub(crate) const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../migrations/sqlite/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "metering",
        sql: include_str!("../migrations/sqlite/0002_metering.sql"),
    },
];
