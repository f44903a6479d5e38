//! Direct hand-off of a lease row to this process's waiter (see [`PgLeaseBackend`]): a
//! release that finds a waiter's offer for its key ends its lease and begins the waiter's,
//! with a new token, in one statement (`lease_handoff`), instead of a release, a wake-up
//! and the waiter's own grant: about half the time of a hand-off in the process.
//!
//! [`PgLeaseBackend`]: crate::PgLeaseBackend

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use lock_core::{Grant, LeaseId, LockKey};
use tokio::sync::oneshot;

/// Direct hand-offs of one key in a row before a release goes through the server.
pub(crate) const MAX_STREAK: u32 = 4;

/// How a release goes.
#[derive(Debug)]
pub(crate) enum Release {
    /// Straight to this waiter, in one statement.
    Direct(Waiter),
    /// Through the server, waking this process's waiter at once.
    Server,
    /// Through the server, after a streak of direct hand-offs. This process's waiter
    /// learns of it from the server's notification, as other processes' waiters do, so
    /// that it does not win the race for the row by being woken first.
    Yield,
}

/// A waiter's offer, taken by a release.
#[derive(Debug)]
pub(crate) struct Waiter {
    /// The waiter's lease id.
    pub(crate) lease_id: LeaseId,
    /// Its encoded holder metadata.
    pub(crate) meta: String,
    /// Its lease.
    pub(crate) ttl: Duration,
    /// The grant handed over, or `None` (the holder's lease had ended, or the statement
    /// failed): the waiter tries again on its own.
    tx: oneshot::Sender<Option<Grant>>,
}

impl Waiter {
    /// Tells the waiter. `false` if it is gone (it gave up or was cancelled while the
    /// release ran): a grant made for it must then be given back.
    pub(crate) fn tell(self, h: Option<Grant>) -> bool {
        self.tx.send(h).is_ok()
    }
}

#[derive(Debug, Default)]
struct Slot {
    waiter: Option<Waiter>,
    streak: u32,
}

/// The offers of one client's waiters, per key.
#[derive(Debug, Default)]
pub(crate) struct Handoffs {
    slots: Mutex<HashMap<String, Slot>>,
}

impl Handoffs {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Leaves an offer for `key` while this waiter waits. Only the head waiter of a key
    /// waits on the server, so a key has at most one; a second one is inert (never taken).
    pub(crate) fn offer(
        &self,
        key: &LockKey,
        lease_id: &LeaseId,
        meta: String,
        ttl: Duration,
    ) -> Offer<'_> {
        let (tx, rx) = oneshot::channel();
        let mut slots = self.slots();
        let slot = slots.entry(key.as_str().to_owned()).or_default();
        let rx = if slot.waiter.is_none() {
            slot.waiter = Some(Waiter {
                lease_id: lease_id.clone(),
                meta,
                ttl,
                tx,
            });
            Some(rx)
        } else {
            None
        };
        Offer {
            owner: self,
            key: key.as_str().to_owned(),
            lease_id: lease_id.clone(),
            rx,
        }
    }

    /// How a release of `key` goes: to this process's waiter directly, unless the key has
    /// been handed over directly [`MAX_STREAK`] times in a row.
    pub(crate) fn take(&self, key: &LockKey) -> Release {
        let mut slots = self.slots();
        let Some(slot) = slots.get_mut(key.as_str()) else {
            return Release::Server;
        };
        if slot.waiter.is_none() {
            return Release::Server;
        }
        if slot.streak >= MAX_STREAK {
            return Release::Yield;
        }
        slot.streak += 1;
        slot.waiter.take().map_or(Release::Server, Release::Direct)
    }

    /// A release went through the server: the key's streak starts again.
    pub(crate) fn released(&self, key: &LockKey) {
        let mut slots = self.slots();
        if let Some(slot) = slots.get_mut(key.as_str()) {
            slot.streak = 0;
            if slot.waiter.is_none() {
                slots.remove(key.as_str());
            }
        }
    }
}

/// A waiter's standing offer; withdrawn when dropped.
#[derive(Debug)]
pub(crate) struct Offer<'a> {
    owner: &'a Handoffs,
    key: String,
    lease_id: LeaseId,
    /// None for an inert offer.
    rx: Option<oneshot::Receiver<Option<Grant>>>,
}

impl Offer<'_> {
    /// What a release that took this offer handed over: `Some` grant, or `None` when it
    /// handed nothing (the waiter tries again). Pending until a release takes the offer.
    pub(crate) async fn handed(&mut self) -> Option<Grant> {
        let Some(rx) = self.rx.as_mut() else {
            return std::future::pending().await;
        };
        let handed = rx.await;
        self.rx = None;
        handed.ok().flatten()
    }

    /// Takes the offer back. `false` when a release has already taken it: its answer
    /// ([`handed`](Self::handed)) is on the way.
    pub(crate) fn withdraw(&mut self) -> bool {
        if self.rx.is_none() {
            return true;
        }
        let mut slots = self.owner.slots();
        let Some(slot) = slots.get_mut(&self.key) else {
            return false;
        };
        match &slot.waiter {
            Some(w) if w.lease_id == self.lease_id => {
                slot.waiter = None;
                if slot.streak == 0 {
                    slots.remove(&self.key);
                }
                self.rx = None;
                true
            }
            _ => false,
        }
    }
}

impl Drop for Offer<'_> {
    fn drop(&mut self) {
        // A release that took the offer finds the receiver gone and gives the grant back.
        self.withdraw();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> LockKey {
        LockKey::new("k").unwrap()
    }

    fn offer<'a>(h: &'a Handoffs, lease: &LeaseId) -> Offer<'a> {
        h.offer(&key(), lease, String::new(), Duration::from_secs(1))
    }

    #[test]
    fn a_key_is_handed_over_directly_at_most_max_streak_times_in_a_row() {
        let h = Handoffs::default();
        let k = key();
        let mut handed = 0;
        for _ in 0..(MAX_STREAK + 2) {
            let l = LeaseId::random();
            let mut o = offer(&h, &l);
            match h.take(&k) {
                Release::Direct(w) => {
                    assert_eq!(w.lease_id, l);
                    handed += 1;
                    assert!(!o.withdraw(), "a taken offer cannot be withdrawn");
                }
                Release::Yield => assert!(o.withdraw()),
                Release::Server => panic!("a waiter was there"),
            }
        }
        assert_eq!(handed, MAX_STREAK);
        h.released(&k);
        let _o = offer(&h, &LeaseId::random());
        assert!(
            matches!(h.take(&k), Release::Direct(_)),
            "a release through the server resets the streak"
        );
    }

    #[test]
    fn withdrawn_and_dropped_offers_leave_nothing() {
        let h = Handoffs::default();
        let k = key();
        let mut o = offer(&h, &LeaseId::random());
        assert!(o.withdraw());
        assert!(matches!(h.take(&k), Release::Server));
        drop(o);
        drop(offer(&h, &LeaseId::random()));
        assert!(matches!(h.take(&k), Release::Server));
        assert!(h.slots().is_empty());
    }

    #[test]
    fn a_second_offer_for_a_key_is_inert() {
        let h = Handoffs::default();
        let k = key();
        let first = LeaseId::random();
        let _a = offer(&h, &first);
        let mut b = offer(&h, &LeaseId::random());
        assert!(b.withdraw());
        match h.take(&k) {
            Release::Direct(w) => assert_eq!(w.lease_id, first),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_gone_waiter_is_reported_to_the_releaser() {
        let h = Handoffs::default();
        let k = key();
        let o = offer(&h, &LeaseId::random());
        let Release::Direct(w) = h.take(&k) else {
            panic!("no waiter")
        };
        drop(o);
        assert!(!w.tell(None));
        let mut o = offer(&h, &LeaseId::random());
        let Release::Direct(w) = h.take(&k) else {
            panic!("no waiter")
        };
        assert!(w.tell(None));
        assert!(o.handed().await.is_none());
    }
}
