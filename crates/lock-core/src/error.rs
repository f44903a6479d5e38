//! The one error type shared by every backend.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

/// Why a held lock was lost.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LossReason {
    /// The lease ran out before a renewal reached the store.
    Expired,
    /// Renewals kept failing until the safe deadline passed.
    RenewalFailed(String),
    /// The store says another lease now holds the key (or none does).
    NotHeld,
    /// The session or connection that carried the lock ended (ZooKeeper session expiry,
    /// PostgreSQL backend terminated, ...).
    SessionEnded(String),
}

impl fmt::Display for LossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Expired => f.write_str("the lease expired"),
            Self::RenewalFailed(e) => write!(f, "renewals failed until the lease ran out: {e}"),
            Self::NotHeld => f.write_str("the store no longer holds this lease"),
            Self::SessionEnded(e) => write!(f, "the session carrying the lock ended: {e}"),
        }
    }
}

/// Every error the lock crates return.
///
/// Acquire, renew and release failures are distinct variants, so callers (and the
/// conformance suite) can tell them apart on every backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// The key is not acceptable (empty, too long, illegal characters for this backend).
    #[error("invalid lock key {key:?}: {reason}")]
    InvalidKey {
        /// The rejected key (truncated to 64 characters).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The options are not acceptable (zero or absurd lease, bad intervals, ...).
    #[error("invalid lock options: {0}")]
    InvalidOptions(String),
    /// The backend configuration is not acceptable (bad URL, bad schema or table name, ...).
    #[error("invalid backend configuration: {0}")]
    InvalidConfig(String),
    /// The key is held by someone else and the caller asked not to wait.
    #[error("lock {key:?} is held by another owner")]
    Contended {
        /// The key.
        key: String,
    },
    /// The caller waited for the key as long as allowed and did not get it.
    #[error("timed out after {waited:?} waiting for lock {key:?}")]
    Timeout {
        /// The key.
        key: String,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The lock was lost while it was believed held.
    #[error("lock {key:?} was lost: {reason}")]
    Lost {
        /// The key.
        key: String,
        /// Why.
        reason: LossReason,
    },
    /// The lock may or may not still be held: renewals are failing or the session is
    /// suspended, and the safe deadline has not passed yet. Do not start new work; the
    /// status may return to `Held`, or turn `Lost`.
    #[error("lock {key:?} is uncertain: the store has not confirmed it lately (renewals failing or session suspended); it may still be held")]
    Uncertain {
        /// The key.
        key: String,
    },
    /// Renew or release named a lease the store does not hold (expired or taken over).
    #[error("lock {key:?} is not held by this lease")]
    NotHeld {
        /// The key.
        key: String,
    },
    /// The backend does not support the requested operation.
    #[error("{backend} does not support {what}")]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// The operation.
        what: String,
    },
    /// The store answered something this library cannot interpret.
    #[error("unexpected reply from the store: {0}")]
    Protocol(String),
    /// The store operation did not complete within the configured operation timeout.
    /// Its outcome is unknown.
    #[error("{backend} did not answer within {after:?} ({op})")]
    OperationTimeout {
        /// Backend name.
        backend: &'static str,
        /// The operation.
        op: &'static str,
        /// The timeout that ran out.
        after: Duration,
    },
    /// The store or its client library failed.
    #[error("{backend} error: {source}")]
    Backend {
        /// Backend name.
        backend: &'static str,
        /// Whether the same call may succeed if tried again (connection errors, failovers).
        retryable: bool,
        /// The underlying error.
        #[source]
        source: Box<dyn StdError + Send + Sync + 'static>,
    },
}

impl LockError {
    /// An [`LockError::InvalidKey`], with the key shortened for display.
    pub fn invalid_key(key: &str, reason: impl Into<String>) -> Self {
        let key: String = key.chars().take(64).collect();
        Self::InvalidKey {
            key,
            reason: reason.into(),
        }
    }

    /// A [`LockError::Contended`] for `key`.
    pub fn contended(key: impl fmt::Display) -> Self {
        Self::Contended {
            key: key.to_string(),
        }
    }

    /// A [`LockError::Timeout`] for `key`, after waiting `waited`.
    pub fn timeout(key: impl fmt::Display, waited: Duration) -> Self {
        Self::Timeout {
            key: key.to_string(),
            waited,
        }
    }

    /// What session backends (the lock lives as long as a session or connection) answer
    /// to `renew`: there is no lease to extend.
    pub fn no_lease_to_extend(backend: &'static str) -> Self {
        Self::Unsupported {
            backend,
            what: "renewal: the lock lives as long as its session; there is no lease to extend"
                .into(),
        }
    }

    /// A [`LockError::Backend`] from any error.
    pub fn backend(
        backend: &'static str,
        retryable: bool,
        source: impl Into<Box<dyn StdError + Send + Sync + 'static>>,
    ) -> Self {
        Self::Backend {
            backend,
            retryable,
            source: source.into(),
        }
    }

    /// Whether retrying the same call may succeed: connection failures and timeouts are
    /// retryable; invalid input, contention and loss are not (contention is resolved by
    /// waiting, not retrying).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Backend {
                retryable: true,
                ..
            } | Self::OperationTimeout { .. }
        )
    }

    /// Whether this is a timeout (waiting for the lock, or an operation).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. } | Self::OperationTimeout { .. })
    }
}
