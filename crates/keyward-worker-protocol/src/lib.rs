//! The gateway ⇄ worker boundary: the socket [`protocol`] (small, versioned, length-framed;
//! its decoder is the worker's trust boundary) and the gateway's typed [`client`].
//!
//! Owns: the frames and their encoding, and the one place the gateway talks to a worker.
//! Must never: carry a plaintext key (requests carry sealed blobs; answers carry provider
//! responses and new blobs), or pull in the worker's sandbox, locked memory or HTTP client,
//! so the gateway can depend on it alone.

pub mod client;
pub mod protocol;

pub use client::{ResponseHead, WorkerConn, WorkerError};
