#![doc = include_str!("../README.md")]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod batch;
mod config;
mod redlock;
mod scripts;
mod single;

pub use config::RedisConfig;
pub use redlock::RedlockBackend;
pub use single::RedisBackend;

/// The core types, so one dependency is enough.
pub use lock_core::{
    self, FenceRejected, FencingToken, LockClient, LockError, LockGuard, LockHandle, LockOptions,
    LockStatus, WaitPolicy,
};
/// The client library this backend is built on.
pub use redis;
