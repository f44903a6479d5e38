#![doc = include_str!("../README.md")]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod batch;
mod config;
mod error;
mod redlock;
mod scripts;
mod single;

pub use config::RedisConfig;
pub use redlock::{RedlockBackend, RedlockConfig};
pub use single::{FencedValue, RedisBackend};

/// The core types, so one dependency is enough.
pub use lock_core::{
    self, Backoff, FenceRejected, Fenced, FencedWrite, FencingToken, HolderMeta, LeaseId,
    LockBackend, LockClient, LockError, LockGuard, LockHandle, LockInfo, LockKey, LockOptions,
    LockStatus, LossReason, ReleaseOutcome, WaitPolicy,
};
/// The client library this backend is built on.
pub use redis;
