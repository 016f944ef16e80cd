//! HTTP handlers, one module per resource.

pub mod ai;
pub mod audit;
pub mod external;
pub mod key_test;
pub mod me;
pub mod model_keys;
pub mod ops;
pub mod passthrough;
pub mod usage;
