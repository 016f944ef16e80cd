//! A small versioned migration runner: each backend lists its `migrations/` files in
//! order; applied versions are recorded in `keyward_migrations`, and each migration runs
//! in its own transaction with its record. Both backends have the same versions and names;
//! only the SQL dialect differs.

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
    Migration {
        version: 3,
        name: "kek_sealers",
        sql: include_str!("../migrations/sqlite/0003_kek_sealers.sql"),
    },
    Migration {
        version: 4,
        name: "key_health",
        sql: include_str!("../migrations/sqlite/0004_key_health.sql"),
    },
    Migration {
        version: 5,
        name: "services_webhooks",
        sql: include_str!("../migrations/sqlite/0005_services_webhooks.sql"),
    },
    Migration {
        version: 6,
        name: "sessions",
        sql: include_str!("../migrations/sqlite/0006_sessions.sql"),
    },
    Migration {
        version: 8,
        name: "platform_audit",
        sql: include_str!("../migrations/sqlite/0008_platform_audit.sql"),
    },
];

pub(crate) const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../migrations/postgres/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "metering",
        sql: include_str!("../migrations/postgres/0002_metering.sql"),
    },
    Migration {
        version: 3,
        name: "kek_sealers",
        sql: include_str!("../migrations/postgres/0003_kek_sealers.sql"),
    },
    Migration {
        version: 4,
        name: "key_health",
        sql: include_str!("../migrations/postgres/0004_key_health.sql"),
    },
    Migration {
        version: 5,
        name: "services_webhooks",
        sql: include_str!("../migrations/postgres/0005_services_webhooks.sql"),
    },
    Migration {
        version: 6,
        name: "sessions",
        sql: include_str!("../migrations/postgres/0006_sessions.sql"),
    },
    Migration {
        version: 8,
        name: "platform_audit",
        sql: include_str!("../migrations/postgres/0008_platform_audit.sql"),
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_have_the_same_versions_and_names() {
        let names = |m: &[Migration]| m.iter().map(|m| (m.version, m.name)).collect::<Vec<_>>();
        assert_eq!(names(SQLITE), names(POSTGRES));
        let versions: Vec<i64> = SQLITE.iter().map(|m| m.version).collect();
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "versions ascend");
    }
}
