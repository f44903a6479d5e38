#![doc = include_str!("../README.md")]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod backend;
mod config;
mod docs;
mod error;

pub use backend::MongoBackend;
pub use config::{Durability, MongoConfig};

/// The core types, so one dependency is enough.
pub use lock_core::{
    self, Backoff, FenceRejected, Fenced, FencedWrite, FencingToken, HolderMeta, LeaseId,
    LockBackend, LockClient, LockError, LockGuard, LockHandle, LockInfo, LockKey, LockOptions,
    LockStatus, LossReason, ReleaseOutcome, WaitPolicy,
};
/// The client library this backend is built on.
pub use mongodb;
