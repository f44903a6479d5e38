#![doc = include_str!("../README.md")]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod backend;
mod config;
mod path;
#[cfg(feature = "tls")]
mod tls;

pub use backend::ZkBackend;
pub use config::{ZkAcl, ZkConfig};
pub use path::escape_key;

/// The core types, so one dependency is enough.
pub use lock_core::{
    self, Backoff, FenceRejected, Fenced, FencedWrite, FencingToken, HolderMeta, LeaseId,
    LockBackend, LockClient, LockError, LockGuard, LockHandle, LockInfo, LockKey, LockOptions,
    LockStatus, LossReason, ReleaseOutcome, WaitPolicy,
};
/// The client library this backend is built on.
pub use zookeeper_client;
