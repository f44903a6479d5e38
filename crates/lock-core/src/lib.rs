#![doc = include_str!("../README.md")]
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
// Per-key registries the backend crates of this workspace share; not a user API.
#[doc(hidden)]
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
pub use token::{FenceRejected, Fenced, FencedWrite, FencingToken};

/// A mutex's contents even if a holder panicked: every critical section here leaves its
/// state consistent.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Re-exported so backends and users share one `async-trait`.
pub use async_trait::async_trait;
