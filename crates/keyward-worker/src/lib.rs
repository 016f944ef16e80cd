//! keyward's isolated worker: the only process that ever opens a sealed key.
//!
//! Owns: the worker process ([`server`]: sandbox first, then accept only the parent
//! gateway on a Unix socket, speaking `keyward-worker-protocol`), locked memory for plaintext keys ([`locked`]), a minimal HTTP/1.1 client that writes
//! the key straight from locked memory ([`http1`]), and the masking of keys a provider
//! echoes back ([`scrub`]), and re-wrapping a blob to another KEK version (`Rewrap`: open
//! into locked memory, seal again, wipe; only blobs cross the socket). The sandbox and what each layer stops is described in
//! [`sandbox`].
//!
//! Must never: touch the database, write a file after start-up, log anything from a
//! request but its id and timing, keep a plaintext key or DEK beyond the one call it was
//! opened for, send a key to any host but its provider's configured base URL, follow a
//! redirect, or accept a connection from any process but its parent (or, when configured,
//! the gateway's uid: a gateway of its own OS user, or a worker run as its own service).

pub mod http1;
pub mod locked;
pub mod sandbox;
pub mod scrub;
pub mod server;

pub use server::{run, WorkerConfig, WorkerError};
