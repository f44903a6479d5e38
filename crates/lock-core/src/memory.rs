//! An in-memory backend with the full contract, for tests and single-process use.
//!
//! A [`MemoryStore`] plays the server; each [`MemoryBackend`] from
//! [`MemoryStore::connect`] is one client connection. Expiry is judged on the store's own
//! clock. Waiters queue in FIFO order and are woken on release.
//!
//! With the `testing` feature, fault controls simulate what real stores do to a client:
//! `MemoryStore::advance` moves the store's clock (a holder paused past its lease),
//! `MemoryBackend::set_disconnected` cuts a connection, `MemoryBackend::pause_renewals`
//! stops its renewals from arriving, `MemoryBackend::lose_replies` loses the answers to
//! requests the store still carries out.
//!
#![cfg_attr(not(feature = "testing"), doc = "```ignore")]
#![cfg_attr(feature = "testing", doc = "```")]
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::time::Duration;
//! use lock_core::{LockClient, LockOptions, LockStatus, memory::MemoryStore};
//! let store = MemoryStore::new();
//! let conn = store.connect();
//! let client = LockClient::new(conn.clone())
//!     .with_options(LockOptions::default().lease(Duration::from_millis(200)));
//! let guard = client.acquire("job").await.unwrap();
//! conn.pause_renewals(true); // the holder's renewals stop reaching the store
//! let reason = guard.lost().await;
//! assert!(reason.is_some());
//! assert!(matches!(guard.status(), LockStatus::Lost(_)));
//! # }
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::backend::{
    AcquireRequest, Capabilities, Grant, LeaseKind, LeaseRef, LockBackend, LockInfo,
    ReleaseOutcome, TokenGuarantee,
};
use crate::error::LockError;
use crate::key::{HolderMeta, LeaseId, LockKey};
use crate::token::FencingToken;

const NAME: &str = "memory";
/// A waiter that has not re-checked for this long is presumed dead and leaves the queue,
/// so a crashed waiter never blocks the ones behind it.
const QUEUE_STALE: Duration = Duration::from_secs(3);
/// Waiters re-check at least this often, which keeps their queue entry fresh.
const QUEUE_REFRESH: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Holder {
    lease_id: LeaseId,
    token: u64,
    expires_at: Duration,
    meta: HolderMeta,
}

#[derive(Debug, Default)]
struct KeyState {
    holder: Option<Holder>,
    last_token: u64,
    /// Waiters in arrival order, with the (real) time each was last seen waiting.
    queue: VecDeque<(LeaseId, Duration)>,
    notify: Arc<Notify>,
}

#[derive(Debug)]
struct StoreInner {
    keys: Mutex<HashMap<String, KeyState>>,
    epoch: Instant,
    offset_ms: AtomicU64,
}

/// The in-memory "server". Cheap to clone; clones share state.
#[derive(Clone, Debug)]
pub struct MemoryStore {
    inner: Arc<StoreInner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(StoreInner {
                keys: Mutex::new(HashMap::new()),
                epoch: Instant::now(),
                offset_ms: AtomicU64::new(0),
            }),
        }
    }

    /// A new client connection.
    pub fn connect(&self) -> MemoryBackend {
        MemoryBackend {
            store: self.clone(),
            flags: Arc::new(ClientFlags::default()),
        }
    }

    /// Moves the store's clock forward: leases expire as if `by` had passed, while clients'
    /// own monotonic clocks do not move. Simulates a client paused past its lease.
    #[cfg(feature = "testing")]
    pub fn advance(&self, by: Duration) {
        self.inner
            .offset_ms
            .fetch_add(by.as_millis() as u64, Ordering::SeqCst);
        for ks in self.keys().values() {
            ks.notify.notify_waiters();
        }
    }

    fn now(&self) -> Duration {
        self.inner.epoch.elapsed()
            + Duration::from_millis(self.inner.offset_ms.load(Ordering::SeqCst))
    }

    fn keys(&self) -> MutexGuard<'_, HashMap<String, KeyState>> {
        crate::lock(&self.inner.keys)
    }
}

#[derive(Debug, Default)]
struct ClientFlags {
    disconnected: AtomicBool,
    renewals_paused: AtomicBool,
    replies_lost: AtomicBool,
}

/// One client connection to a [`MemoryStore`]. Clones share the connection.
#[derive(Clone, Debug)]
pub struct MemoryBackend {
    store: MemoryStore,
    flags: Arc<ClientFlags>,
}

impl MemoryBackend {
    /// Cuts (`true`) or restores (`false`) this connection: every operation fails with a
    /// retryable backend error while cut, as with a network partition.
    #[cfg(feature = "testing")]
    pub fn set_disconnected(&self, cut: bool) {
        self.flags.disconnected.store(cut, Ordering::SeqCst);
    }

    /// Makes renewals from this connection fail (`true`) or succeed again (`false`), as if
    /// the holder's renewals stopped reaching the store.
    #[cfg(feature = "testing")]
    pub fn pause_renewals(&self, paused: bool) {
        self.flags.renewals_paused.store(paused, Ordering::SeqCst);
    }

    /// Makes the store carry out this connection's requests but lose their answers
    /// (`true`): each fails with a retryable backend error, as when a connection breaks
    /// after the request reached the server; `false` restores the answers.
    #[cfg(feature = "testing")]
    pub fn lose_replies(&self, lost: bool) {
        self.flags.replies_lost.store(lost, Ordering::SeqCst);
    }

    /// The answer to a request the store carried out, unless replies are being lost.
    fn reply<T>(&self, answer: Result<T, LockError>) -> Result<T, LockError> {
        if self.flags.replies_lost.load(Ordering::SeqCst) {
            return Err(LockError::backend(
                NAME,
                true,
                "the reply was lost (simulated)",
            ));
        }
        answer
    }

    fn check_connected(&self) -> Result<(), LockError> {
        if self.flags.disconnected.load(Ordering::SeqCst) {
            return Err(LockError::backend(
                NAME,
                true,
                "connection is cut (simulated)",
            ));
        }
        Ok(())
    }

    /// Takes the lock if free (and, with `fair`, if `lease` is first in the queue); else
    /// what to wait on and how long the holder's lease has left.
    fn attempt(
        &self,
        req: &AcquireRequest,
        enqueue: bool,
    ) -> Result<Grant, (Arc<Notify>, Duration)> {
        let sent = Instant::now();
        let now = self.store.now();
        let mut keys = self.store.keys();
        let ks = keys.entry(req.key.as_str().to_owned()).or_default();
        if ks.holder.as_ref().is_some_and(|h| h.expires_at <= now) {
            ks.holder = None;
        }
        let real_now = self.store.inner.epoch.elapsed();
        ks.queue
            .retain(|(l, seen)| *l == req.lease_id || *seen + QUEUE_STALE > real_now);
        let first = ks.queue.front().is_none_or(|(f, _)| *f == req.lease_id);
        if ks.holder.is_none() && first {
            if ks.queue.front().is_some_and(|(f, _)| *f == req.lease_id) {
                ks.queue.pop_front();
            }
            ks.last_token += 1;
            ks.holder = Some(Holder {
                lease_id: req.lease_id.clone(),
                token: ks.last_token,
                expires_at: now + req.ttl,
                meta: req.meta.clone(),
            });
            return Ok(Grant::ttl(FencingToken::new(ks.last_token), sent + req.ttl));
        }
        if enqueue {
            match ks.queue.iter_mut().find(|(l, _)| *l == req.lease_id) {
                Some(entry) => entry.1 = real_now,
                None => ks.queue.push_back((req.lease_id.clone(), real_now)),
            }
        }
        let holder_left = ks
            .holder
            .as_ref()
            .map(|h| h.expires_at.saturating_sub(now))
            .unwrap_or_default();
        Err((ks.notify.clone(), holder_left))
    }
}

#[async_trait]
impl LockBackend for MemoryBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(LeaseKind::Ttl)
            .fair(true)
            .notify_waits(true)
            .tokens(TokenGuarantee::Durable)
    }

    async fn try_acquire(&self, req: &AcquireRequest) -> Result<Grant, LockError> {
        crate::options::check_lease("lease", req.ttl)?;
        self.check_connected()?;
        let answer = self.attempt(req, false);
        self.reply(answer.map_err(|_| LockError::contended(&req.key)))
    }

    async fn acquire(
        &self,
        req: &AcquireRequest,
        deadline: Option<Instant>,
    ) -> Result<Grant, LockError> {
        crate::options::check_lease("lease", req.ttl)?;
        let started = Instant::now();
        loop {
            self.check_connected()?;
            let (notify, holder_left) = match self.attempt(req, true) {
                Ok(g) => return self.reply(Ok(g)),
                Err(w) => w,
            };
            let notified = notify.notified();
            // Wake at the holder's expiry (store time and local time run at the same rate
            // unless the test moves the store's clock, which wakes everyone).
            let mut wake =
                Instant::now() + holder_left.clamp(Duration::from_millis(1), QUEUE_REFRESH);
            if let Some(d) = deadline {
                wake = wake.min(d);
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let lease = req.lease();
                let _ = self.release(&lease).await;
                return Err(LockError::timeout(&req.key, started.elapsed()));
            }
        }
    }

    async fn renew(&self, lease: &LeaseRef, ttl: Duration) -> Result<Instant, LockError> {
        crate::options::check_lease("lease", ttl)?;
        self.check_connected()?;
        if self.flags.renewals_paused.load(Ordering::SeqCst) {
            return Err(LockError::backend(
                NAME,
                true,
                "renewals are paused (simulated)",
            ));
        }
        let sent = Instant::now();
        let now = self.store.now();
        let mut keys = self.store.keys();
        let answer = match keys
            .get_mut(lease.key.as_str())
            .and_then(|ks| ks.holder.as_mut())
        {
            Some(h) if h.lease_id == lease.lease_id && h.expires_at > now => {
                h.expires_at = now + ttl;
                Ok(sent + ttl)
            }
            _ => Err(LockError::NotHeld {
                key: lease.key.to_string(),
            }),
        };
        self.reply(answer)
    }

    async fn release(&self, lease: &LeaseRef) -> Result<ReleaseOutcome, LockError> {
        self.check_connected()?;
        let now = self.store.now();
        let mut keys = self.store.keys();
        let Some(ks) = keys.get_mut(lease.key.as_str()) else {
            return self.reply(Ok(ReleaseOutcome::NotHeld));
        };
        ks.queue.retain(|(l, _)| *l != lease.lease_id);
        let outcome = match ks.holder.take_if(|h| h.lease_id == lease.lease_id) {
            Some(h) if h.expires_at > now => ReleaseOutcome::Released,
            _ => ReleaseOutcome::NotHeld,
        };
        ks.notify.notify_waiters();
        self.reply(Ok(outcome))
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>, LockError> {
        self.check_connected()?;
        self.reply(Ok(()))?;
        let now = self.store.now();
        let keys = self.store.keys();
        let Some(ks) = keys.get(key.as_str()) else {
            return Ok(None);
        };
        Ok(ks
            .holder
            .as_ref()
            .filter(|h| h.expires_at > now)
            .map(|h| LockInfo {
                lease_id: h.lease_id.clone(),
                token: FencingToken::new(h.token),
                meta: h.meta.clone(),
                remaining: Some(h.expires_at - now),
                waiters: Some(ks.queue.len()),
            }))
    }
}
