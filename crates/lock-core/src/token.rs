//! Fencing tokens and the resource-side check.
//!
//! A lease cannot stop a paused client from acting late: it may wake after its lease ran
//! out, still believing it holds the lock. What keeps the data safe is the **fence**: every
//! grant carries a [`FencingToken`] that is strictly greater than every earlier grant's for
//! the same key, and the resource refuses a write whose token is lower than the highest it
//! has accepted.

use std::fmt;
use std::sync::Mutex;

/// A fencing token.
///
/// Contract, kept by every backend: for one key, every grant's token is strictly greater
/// than the token of every grant made before it, across release, expiry, deletion of the
/// lock records and (for backends whose capabilities say tokens are durable) server restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    /// Wraps a raw value read from a store.
    pub const fn new(v: u64) -> Self {
        Self(v)
    }

    /// The raw value, for storing beside a resource.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a fenced write was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("fenced write refused: token {offered} is lower than the highest accepted token {highest}")]
pub struct FenceRejected {
    /// The token the writer offered.
    pub offered: FencingToken,
    /// The highest token the resource had accepted.
    pub highest: FencingToken,
}

/// What a fenced write did: [`Fenced::update`] in memory, and each store's own
/// (`lock_redis::RedisBackend::fenced_set`, `lock_pg::fenced_update`,
/// `lock_mongo::MongoBackend::fenced_update`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
#[must_use = "a refused fenced write wrote nothing"]
pub enum FencedWrite {
    /// This many records were updated (and now carry the token).
    Applied(u64),
    /// Refused: a matching record was written with a higher token (a later holder of the
    /// lock already acted). Nothing was written.
    Refused {
        /// The highest token stored in the matching records.
        highest: FencingToken,
    },
    /// No record matched the filter. Nothing was written.
    NoMatch,
}

impl FencedWrite {
    /// Whether the write was applied.
    pub fn is_applied(&self) -> bool {
        matches!(self, Self::Applied(_))
    }
}

fn admit(highest: &mut Option<FencingToken>, token: FencingToken) -> Result<(), FenceRejected> {
    match *highest {
        Some(h) if token < h => Err(FenceRejected {
            offered: token,
            highest: h,
        }),
        _ => {
            *highest = Some(token);
            Ok(())
        }
    }
}

/// A value guarded by a fence: reads are free, writes need a token that passes the fence.
/// The check and the write happen atomically.
#[derive(Debug, Default)]
pub struct Fenced<T> {
    inner: Mutex<(Option<FencingToken>, T)>,
}

impl<T: Clone> Fenced<T> {
    /// A fenced value with no token accepted yet.
    pub fn new(value: T) -> Self {
        Self {
            inner: Mutex::new((None, value)),
        }
    }

    /// Reads the value for a read-modify-write under `token`, and raises the fence to
    /// `token` first. Use this, not [`Fenced::read`], when the write will depend on what
    /// was read: otherwise an older holder that is still running can write between this
    /// holder's read and its write (its token is higher than anything written so far), and
    /// one of the two updates is lost. Fails if a newer holder already came by.
    pub fn read_with(&self, token: FencingToken) -> Result<T, FenceRejected> {
        let mut g = crate::lock(&self.inner);
        admit(&mut g.0, token)?;
        Ok(g.1.clone())
    }

    /// Runs a read-modify-write under `token` atomically: `f` gets the current value and
    /// returns the new one.
    pub fn update(&self, token: FencingToken, f: impl FnOnce(&T) -> T) -> FencedWrite {
        let mut g = crate::lock(&self.inner);
        match admit(&mut g.0, token) {
            Ok(()) => {
                g.1 = f(&g.1);
                FencedWrite::Applied(1)
            }
            Err(r) => FencedWrite::Refused { highest: r.highest },
        }
    }

    /// The current value (no fence check: for display, or for writes that do not depend
    /// on it; see [`Fenced::read_with`]).
    pub fn read(&self) -> T {
        crate::lock(&self.inner).1.clone()
    }

    /// Writes `value` if `token` passes the fence.
    pub fn write(&self, token: FencingToken, value: T) -> FencedWrite {
        self.update(token, |_| value)
    }

    /// The highest token accepted so far.
    pub fn highest(&self) -> Option<FencingToken> {
        crate::lock(&self.inner).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fenced_reads_stop_an_older_holder_between_read_and_write() {
        let v = Fenced::new(10u32);
        let (old, new) = (FencingToken::new(1), FencingToken::new(2));
        let seen_old = v.read_with(old).unwrap();
        // The newer holder reads: the fence rises to its token.
        let seen_new = v.read_with(new).unwrap();
        // The older holder's write, between the newer one's read and write, is refused.
        assert_eq!(
            v.write(old, seen_old + 1),
            FencedWrite::Refused { highest: new }
        );
        assert!(v.write(new, seen_new + 1).is_applied());
        assert_eq!(v.read(), 11);
        assert!(v.update(new, |x| x + 1).is_applied());
        assert!(!v.update(old, |x| x + 1).is_applied());
        assert_eq!(v.read(), 12);
    }

    #[test]
    fn fenced_value_writes_only_with_fresh_tokens() {
        let v = Fenced::new(0u64);
        assert!(v.write(FencingToken::new(2), 1).is_applied());
        assert!(
            v.write(FencingToken::new(2), 3).is_applied(),
            "equal tokens pass"
        );
        let e = v.read_with(FencingToken::new(1)).unwrap_err();
        assert_eq!((e.offered.get(), e.highest.get()), (1, 2));
        assert!(e.to_string().contains("lower"));
        assert!(!v.write(FencingToken::new(1), 7).is_applied());
        assert_eq!(v.read(), 3);
    }
}
