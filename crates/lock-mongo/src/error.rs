//! Error mapping: what a driver error means for a lock operation.

use lock_core::LockError;
use mongodb::error::{ErrorKind, WriteFailure};

pub(crate) const NAME: &str = "mongo";

/// The parts of a driver error that decide what it means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// E11000 on `_id`: another document (a live lease) is there.
    DuplicateKey,
    /// The write was applied on the primary but not acknowledged by the requested majority.
    WriteConcern(i32),
    /// The connection failed or timed out after the request may have been sent.
    Network,
    /// No server could be selected: nothing was sent.
    Unavailable,
    /// A server error with this code.
    Server(i32),
    /// Authentication failed or the user lacks a privilege.
    Access,
    /// The driver refused the input (a bug or a bad option).
    Invalid,
    /// Anything else.
    Other,
}

/// What the caller should do with a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Meaning {
    /// The key is held by someone else.
    Contended,
    /// The operation may or may not have been applied: re-read by lease id.
    Unknown,
    /// It was not applied; trying again may work.
    Transient,
    /// It was not applied and will not work as configured.
    Config,
    /// It was not applied.
    Failed,
}

/// Codes meaning the node is stepping down, recovering or shutting down (SDAM), or an
/// operation was interrupted: the write may or may not have been applied.
const UNKNOWN_OUTCOME_CODES: [i32; 12] = [
    11600, 11602, 10107, 13435, 13436, 189, 91, 7, 6, 89, 9001, 50,
];

pub(crate) fn meaning(f: &Failure) -> Meaning {
    match f {
        Failure::DuplicateKey => Meaning::Contended,
        Failure::WriteConcern(_) | Failure::Network => Meaning::Unknown,
        Failure::Server(c) if UNKNOWN_OUTCOME_CODES.contains(c) => Meaning::Unknown,
        Failure::Unavailable => Meaning::Transient,
        Failure::Server(13 | 18) | Failure::Access | Failure::Invalid => Meaning::Config,
        Failure::Server(_) | Failure::Other => Meaning::Failed,
    }
}

pub(crate) fn failure(e: &mongodb::error::Error) -> Failure {
    match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == 11000 => Failure::DuplicateKey,
        ErrorKind::Write(WriteFailure::WriteError(w)) => Failure::Server(w.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => Failure::WriteConcern(w.code),
        ErrorKind::Command(c) if c.code == 11000 => Failure::DuplicateKey,
        ErrorKind::Command(c) => Failure::Server(c.code),
        ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. } => Failure::Network,
        ErrorKind::ServerSelection { .. } | ErrorKind::DnsResolve { .. } => Failure::Unavailable,
        ErrorKind::Authentication { .. } => Failure::Access,
        ErrorKind::InvalidArgument { .. } | ErrorKind::InvalidTlsConfig { .. } => Failure::Invalid,
        _ => Failure::Other,
    }
}

/// The core error for a failure that is not resolved otherwise.
pub(crate) fn to_lock_error(e: mongodb::error::Error) -> LockError {
    let f = failure(&e);
    match meaning(&f) {
        Meaning::Config => LockError::InvalidConfig(format!("MongoDB refused: {e}")),
        Meaning::Unknown | Meaning::Transient => LockError::backend(NAME, true, e),
        Meaning::Contended | Meaning::Failed => LockError::backend(NAME, false, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_mean_what_a_lock_needs() {
        assert_eq!(meaning(&Failure::DuplicateKey), Meaning::Contended);
        assert_eq!(meaning(&Failure::WriteConcern(64)), Meaning::Unknown);
        assert_eq!(meaning(&Failure::Network), Meaning::Unknown);
        assert_eq!(
            meaning(&Failure::Server(10107)),
            Meaning::Unknown,
            "not primary"
        );
        assert_eq!(
            meaning(&Failure::Server(91)),
            Meaning::Unknown,
            "shutting down"
        );
        assert_eq!(
            meaning(&Failure::Server(50)),
            Meaning::Unknown,
            "maxTimeMS expired"
        );
        assert_eq!(meaning(&Failure::Unavailable), Meaning::Transient);
        assert_eq!(
            meaning(&Failure::Server(13)),
            Meaning::Config,
            "unauthorized"
        );
        assert_eq!(meaning(&Failure::Access), Meaning::Config);
        assert_eq!(meaning(&Failure::Server(2)), Meaning::Failed);
    }

    #[test]
    fn driver_errors_are_classified() {
        let io: mongodb::error::Error =
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset").into();
        assert_eq!(failure(&io), Failure::Network);
        assert!(to_lock_error(io).is_retryable());
    }
}
