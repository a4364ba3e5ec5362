//! rolehost: a WebAssembly plugin host that gives each role a private,
//! prefixed state API backed by Redis or an embedded store.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use rolehost::{backend::MemoryBackend, Host, RoleSpec};
//!
//! let mut host = Host::new(Arc::new(MemoryBackend::new()), "myapp:")?;
//! host.load(&RoleSpec::from_path("target/roles/counter.wasm")?)?;
//! let response = host.call("counter", b"").await?;
//! assert_eq!(response, b"1");
//! # Ok(()) }
//! ```

pub mod acl;
pub mod backend;
mod bindings;
pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod files;
mod glob;
pub mod limits;
pub mod logs;
pub mod manifest;
pub mod metrics;
pub mod namespace;
mod runtime;
pub mod serve;
mod shards;
mod slots;
mod state;
pub mod workers;

pub use error::{CallError, StateError, StateResult};
pub use limits::{Access, Grants, RoleLimits};
pub use runtime::{Host, HostOptions, Role, RoleSpec, GUEST_DIR};
