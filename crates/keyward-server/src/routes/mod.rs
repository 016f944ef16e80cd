//! HTTP handlers, one module per resource.

pub mod audit;
pub mod me;
pub mod model_keys;
pub mod ops;
