//! # lock-core
//!
//! Distributed locks with **fencing tokens**: the traits, the lease lifecycle, one error
//! type, a resource-side fence and an in-memory backend. Store backends live in their own
//! crates (`lock-redis`, `lock-zk`, `lock-pg`, `lock-mongo`) and implement
//! [`LockBackend`].
//!
//! ## The model
//!
//! - [`LockClient::acquire`] waits per [`WaitPolicy`] and returns a [`LockGuard`] holding a
//!   [`FencingToken`] that is strictly greater than every earlier grant's for that key.
//! - While held, the lease is renewed automatically (a third of the lease by default). The
//!   guard's [`LockStatus`] goes `Held -> Uncertain` when renewals fail or the session is
//!   suspended, and `Lost` when the lease can no longer be trusted. [`LockGuard::lost`]
//!   resolves then. [`LockGuard::safe_until`] gives the deadline on the monotonic clock.
//! - [`LockGuard::release`] stops renewal first, then releases (owner-checked, idempotent).
//! - A lease cannot stop a paused process from acting late. Pass the token with every write
//!   and let the resource refuse stale ones: [`FenceRegister`] and [`Fenced`] do that in
//!   memory, and each backend crate ships fenced writes for its own store.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), lock_core::LockError> {
//! use lock_core::{Fenced, LockClient, memory::MemoryStore};
//! let stock = Fenced::new(100u32);
//! let client = LockClient::new(MemoryStore::new().connect());
//! client.with_lock("inventory:item-1", |lock| async move {
//!     let left = stock.read();
//!     stock.write(lock.token(), left - 1).expect("fresh token");
//! }).await?;
//! # Ok(()) }
//! ```
//!
#![doc = include_str!("../IMPLEMENTING.md")]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod backend;
mod client;
pub mod error;
mod guard;
#[cfg(test)]
mod guard_tests;
mod keeper;
pub mod key;
pub mod keyed;
pub mod memory;
pub mod options;
pub mod token;

pub use backend::{
    AcquireRequest, Capabilities, Grant, Keepalive, LeaseKind, LeaseRef, LockBackend, LockInfo,
    ReleaseOutcome, SessionHealth, TokenGuarantee,
};
pub use client::LockClient;
pub use error::{LockError, LossReason};
pub use guard::{LockGuard, LockHandle, LockStatus};
pub use key::{HolderMeta, LeaseId, LockKey, MAX_KEY_LEN};
pub use options::{Backoff, LockOptions, WaitPolicy};
pub use token::{FenceRegister, FenceRejected, Fenced, FencedWrite, FencingToken};

/// Re-exported so backends and users share one `async-trait`.
pub use async_trait::async_trait;
