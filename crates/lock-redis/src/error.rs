//! The error mapping shared by the Redis backends.

use lock_core::LockError;
use redis::RedisError;

pub(crate) const NAME: &str = "redis";

pub(crate) fn map_err(e: RedisError) -> LockError {
    let retryable = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(
                redis::ServerErrorKind::BusyLoading
                    | redis::ServerErrorKind::TryAgain
                    | redis::ServerErrorKind::ReadOnly
                    | redis::ServerErrorKind::MasterDown
            )
        );
    if matches!(
        e.kind(),
        redis::ErrorKind::AuthenticationFailed
            | redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm)
    ) {
        return LockError::InvalidConfig(format!("Redis refused access: {e}"));
    }
    if e.code() == Some("NOAUTH") {
        return LockError::InvalidConfig(format!(
            "Redis refused access: {e} (give a user and password in the URL: redis://user:password@host)"
        ));
    }
    LockError::backend(NAME, retryable, e)
}
