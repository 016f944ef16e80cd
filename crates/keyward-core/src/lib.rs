//! keyward's domain: the words of the product as types.
//!
//! Owns: providers, ids, roles, plans, key sources, `ApiKey` (a secret, built only by
//! parsing its provider's format), `Last4`, the model catalogue and the stable error codes.
//! Must never: do I/O, print a secret (`ApiKey` has no `Display` and a redacting `Debug`),
//! or let a key reach an error message (format errors never repeat their input).

pub mod binding;
pub mod catalogue;
pub mod email;
pub mod error_code;
pub mod ids;
pub mod key;
pub mod outcome;
pub mod provider;
pub mod service;
pub mod tenancy;
pub mod time;

pub use binding::{KeyBinding, KeyOwner};
pub use catalogue::{Catalogue, CatalogueError, ModelEntry, ModelKind, ModelRefusal, ModelStatus};
pub use email::{Email, EmailError};
pub use error_code::ErrorCode;
pub use ids::{AccountId, IdError, KeyId, ServiceId, UserId};
pub use key::{format_hint, format_rules, ApiKey, KeyFormatError, KeyKind, Last4, UnknownKeyKind};
pub use outcome::Outcome;
pub use provider::{Provider, UnknownProvider};
pub use service::{ExternalId, ExternalIdError, Scope, ServiceName, ServiceNameError, UnknownScope};
pub use tenancy::{KeySource, Plan, Role, UnknownValue};
pub use time::{CalendarMonth, UnixMillis};
