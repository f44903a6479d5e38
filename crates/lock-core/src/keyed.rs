//! Per-key objects for backends: turns (a FIFO queue per key within one process) and
//! wake-ups, kept only while someone uses them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{Notify, OwnedMutexGuard};
use tokio::time::Instant;

use crate::error::LockError;
use crate::key::LockKey;

/// Weakly held per-key objects: an entry lives while someone holds its `Arc`.
#[derive(Debug, Default)]
pub struct KeyedRegistry<T>(Mutex<HashMap<String, Weak<T>>>);

impl<T: Default> KeyedRegistry<T> {
    /// The object for `key`, created if nobody holds one.
    pub fn get(&self, key: &str) -> Arc<T> {
        let mut map = crate::lock(&self.0);
        if let Some(v) = map.get(key).and_then(Weak::upgrade) {
            return v;
        }
        if map.len() >= 1024 {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let v = Arc::new(T::default());
        map.insert(key.to_owned(), Arc::downgrade(&v));
        v
    }

    /// Runs `f` on the object for `key`, if someone holds one.
    pub fn with(&self, key: &str, f: impl FnOnce(&T)) {
        let v = {
            let map = crate::lock(&self.0);
            map.get(key).and_then(Weak::upgrade)
        };
        if let Some(v) = v {
            f(&v);
        }
    }
}

/// Per-key FIFO turns within one process: only the head waiter of a key talks to the
/// store; the others wait here, in arrival order.
pub type KeyTurns = KeyedRegistry<tokio::sync::Mutex<()>>;

impl KeyTurns {
    /// Waits for this caller's turn on `key`, until `deadline` (then
    /// [`LockError::Timeout`], counted from `started`).
    pub async fn turn(
        &self,
        key: &LockKey,
        started: Instant,
        deadline: Option<Instant>,
    ) -> Result<OwnedMutexGuard<()>, LockError> {
        let q = self.get(key.as_str());
        match deadline {
            None => Ok(q.lock_owned().await),
            Some(d) => tokio::time::timeout_at(d, q.lock_owned())
                .await
                .map_err(|_| LockError::timeout(key, started.elapsed())),
        }
    }
}

/// Per-key release wake-ups.
pub type KeyWakeups = KeyedRegistry<Notify>;

impl KeyWakeups {
    /// Wakes every task waiting on `key`'s notification now.
    pub fn wake(&self, key: &str) {
        self.with(key, Notify::notify_waiters);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn turns_are_fifo_and_time_out() {
        let turns = KeyTurns::default();
        let k = LockKey::new("k").unwrap();
        let first = turns.turn(&k, Instant::now(), None).await.unwrap();
        let d = Instant::now() + Duration::from_millis(30);
        let e = turns.turn(&k, Instant::now(), Some(d)).await.unwrap_err();
        assert!(matches!(e, LockError::Timeout { .. }));
        drop(first);
        assert!(turns
            .turn(&k, Instant::now(), Some(d + Duration::from_secs(1)))
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn wakeups_reach_only_the_key() {
        let w = KeyWakeups::default();
        let a = w.get("a");
        let b = w.get("b");
        let na = a.notified();
        let nb = b.notified();
        tokio::pin!(na, nb);
        na.as_mut().enable();
        nb.as_mut().enable();
        w.wake("a");
        assert!(tokio::time::timeout(Duration::from_millis(50), na)
            .await
            .is_ok());
        assert!(tokio::time::timeout(Duration::from_millis(50), nb)
            .await
            .is_err());
    }
}
