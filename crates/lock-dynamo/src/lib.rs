#![doc = include_str!("../README.md")]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod backend;
mod config;

pub use backend::DynamoBackend;
pub use config::DynamoConfig;

/// The SDK this backend is built on.
pub use aws_sdk_dynamodb;
/// The core types, so one dependency is enough.
pub use lock_core::{
    self, Backoff, FenceRejected, Fenced, FencedWrite, FencingToken, HolderMeta, LeaseId,
    LockBackend, LockClient, LockError, LockGuard, LockHandle, LockInfo, LockKey, LockOptions,
    LockStatus, LossReason, ReleaseOutcome, WaitPolicy,
};
