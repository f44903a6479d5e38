//! The backend trait: what a store must provide. The client in this crate builds the rest
//! on it (waiting policy, renewal, the lost-lock signal, cancellation, metrics); each method
//! states its contract. For every method: measure lease deadlines on the monotonic clock
//! from **before** the request was sent, judge expiry on the store's clock where the store
//! allows it, and never panic on a reply ([`LockError::Protocol`] or [`LockError::Backend`]).

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{LockError, LossReason};
use crate::key::{HolderMeta, LeaseId, LockKey};
use crate::options::Backoff;
use crate::token::FencingToken;

/// What keeps a granted lock alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseKind {
    /// A time-to-live kept alive by renewals (Redis, Mongo, PostgreSQL lease rows).
    Ttl,
    /// A session or connection: the lock lives while it does (ZooKeeper, PostgreSQL
    /// advisory locks). No renewal; the backend reports session health instead.
    Session,
}

/// How far a backend's fencing tokens can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenGuarantee {
    /// Strictly increasing per key, also across a restart of the store.
    Durable,
    /// Strictly increasing per key while the store keeps its data; the backend documents
    /// the extra assumption that keeps it monotone across a restart that lost data.
    Monotonic,
    /// Not guaranteed (the backend's docs say why).
    None,
}

/// What a backend can do; the client and the conformance suite read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// What keeps the lease alive.
    pub lease: LeaseKind,
    /// Waiters are granted in arrival order.
    pub fair: bool,
    /// Waiters are woken by the store on release instead of polling.
    pub notify_waits: bool,
    /// Token guarantee.
    pub tokens: TokenGuarantee,
    /// The longest key this backend accepts, in bytes.
    pub max_key_len: usize,
    /// `inspect` reports the holder's metadata (host, pid, label). Off where the store
    /// cannot show it to other sessions while the lock is held (PostgreSQL
    /// transaction-scoped locks: the holder's row is uncommitted); lease id and token are
    /// always reported.
    pub holder_meta: bool,
}

impl Capabilities {
    /// Capabilities with the given lease kind, no fairness or notification, durable tokens
    /// and the core key length limit; adjust with the setters.
    pub const fn new(lease: LeaseKind) -> Self {
        Self {
            lease,
            fair: false,
            notify_waits: false,
            tokens: TokenGuarantee::Durable,
            max_key_len: crate::key::MAX_KEY_LEN,
            holder_meta: true,
        }
    }

    /// Sets `fair`.
    #[must_use]
    pub const fn fair(mut self, v: bool) -> Self {
        self.fair = v;
        self
    }

    /// Sets `notify_waits`.
    #[must_use]
    pub const fn notify_waits(mut self, v: bool) -> Self {
        self.notify_waits = v;
        self
    }

    /// Sets `tokens`.
    #[must_use]
    pub const fn tokens(mut self, v: TokenGuarantee) -> Self {
        self.tokens = v;
        self
    }

    /// Sets `holder_meta`.
    #[must_use]
    pub const fn holder_meta(mut self, v: bool) -> Self {
        self.holder_meta = v;
        self
    }

    /// Sets `max_key_len`.
    #[must_use]
    pub const fn max_key_len(mut self, v: usize) -> Self {
        self.max_key_len = v;
        self
    }
}

/// One acquisition request, made by the client before anything is sent.
///
/// A request whose outcome is unknown (its future dropped, or an error other than
/// `Contended`/`Timeout`) must not be sent again: backends may still give back what it
/// created, by lease id, and would end a grant made to the repeat. Make a new request
/// (a fresh lease id) instead, as [`LockClient`](crate::LockClient) does.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AcquireRequest {
    /// The key.
    pub key: LockKey,
    /// This acquisition's unique id.
    pub lease_id: LeaseId,
    /// The lease to ask for (ignored by session backends).
    pub ttl: Duration,
    /// Holder metadata to store beside the lease.
    pub meta: HolderMeta,
    /// Retry/poll pacing for backends that must poll.
    pub backoff: Backoff,
}

impl AcquireRequest {
    /// A request with a fresh lease id.
    pub fn new(key: LockKey, ttl: Duration, meta: HolderMeta, backoff: Backoff) -> Self {
        Self {
            key,
            lease_id: LeaseId::random(),
            ttl,
            meta,
            backoff,
        }
    }

    /// The lease this request would create.
    pub fn lease(&self) -> LeaseRef {
        LeaseRef {
            key: self.key.clone(),
            lease_id: self.lease_id.clone(),
        }
    }
}

/// Names one lease: the key and the acquisition's id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct LeaseRef {
    /// The key.
    pub key: LockKey,
    /// The lease id.
    pub lease_id: LeaseId,
}

impl LeaseRef {
    /// Builds a lease reference.
    pub fn new(key: LockKey, lease_id: LeaseId) -> Self {
        Self { key, lease_id }
    }
}

/// The health of a session that carries a lock (session backends).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionHealth {
    /// Connected; the lock is held, and the server keeps the session at least until
    /// `until` (monotonic, measured from before the request that last confirmed the
    /// session was sent, minus the backend's margin). Past it without a newer `Alive`, the
    /// guard is `Lost` even before the backend reports anything (a process that was paused).
    Alive {
        /// Until when the session is certainly kept.
        until: Instant,
    },
    /// Disconnected or unanswered; the store may or may not still hold the lock.
    Suspended,
    /// The session ended; the lock is gone.
    Ended(LossReason),
}

/// A granted lock, as the backend reports it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Grant {
    /// The fencing token issued with the grant.
    pub token: FencingToken,
    /// Monotonic instant until which the store keeps the lock without a renewal (before any
    /// drift margin), measured from before the request was sent. `None` for session
    /// backends that report on the session instead ([`Grant::session`]), whose
    /// [`SessionHealth::Alive`] carries the deadline.
    pub lease_deadline: Option<Instant>,
    /// Session health updates, for session backends.
    pub session: Option<watch::Receiver<SessionHealth>>,
    /// For a lock held by a session that the server ends after a set time of silence
    /// (PostgreSQL's idle limits): the guard confirms the session on this schedule through
    /// [`LockBackend::renew`], and the lock is safe until the deadline the last
    /// confirmation gave, exactly as a TTL lease. `None`: the lease is the request's ttl.
    pub keepalive: Option<Keepalive>,
}

/// How a session lock with a server-side limit is kept (see [`Grant::keepalive`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Keepalive {
    /// How long the server keeps a silent holder's session after a request reached it.
    pub limit: Duration,
    /// How often the guard confirms the session.
    pub every: Duration,
}

impl Keepalive {
    /// A session kept for `limit` after each request, confirmed every `every`.
    pub fn new(limit: Duration, every: Duration) -> Self {
        Self { limit, every }
    }
}

impl Grant {
    /// A TTL grant.
    pub fn ttl(token: FencingToken, lease_deadline: Instant) -> Self {
        Self {
            token,
            lease_deadline: Some(lease_deadline),
            session: None,
            keepalive: None,
        }
    }

    /// A session grant whose health the backend reports on `session`.
    pub fn session(token: FencingToken, session: watch::Receiver<SessionHealth>) -> Self {
        Self {
            token,
            lease_deadline: None,
            session: Some(session),
            keepalive: None,
        }
    }

    /// A session grant the server keeps until `deadline` unless confirmed again (see
    /// [`Grant::keepalive`]).
    pub fn kept_alive(token: FencingToken, deadline: Instant, keepalive: Keepalive) -> Self {
        Self {
            token,
            lease_deadline: Some(deadline),
            session: None,
            keepalive: Some(keepalive),
        }
    }

    /// The length of the lease behind `lease_deadline`: the server's limit for a
    /// kept-alive session, else the requested ttl.
    pub fn lease_len(&self, requested: Duration) -> Duration {
        self.keepalive.map_or(requested, |k| k.limit)
    }
}

/// What release found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReleaseOutcome {
    /// The lease was held and is now removed.
    Released,
    /// The store did not hold this lease (already released, expired or taken over).
    NotHeld,
}

/// The current holder of a key, as `inspect` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockInfo {
    /// The holder's lease id.
    pub lease_id: LeaseId,
    /// The holder's token: the store's latest grant to this lease, which may be above the
    /// token the holder was handed where an attempt of the same lease that its caller
    /// abandoned was granted again after it (Redis).
    pub token: FencingToken,
    /// The holder's metadata.
    pub meta: HolderMeta,
    /// Time left on the lease by the store's clock (`None` for session leases).
    pub remaining: Option<Duration>,
    /// Waiters queued behind the holder, where the store can tell.
    pub waiters: Option<usize>,
}

impl LockInfo {
    /// Holder information with no remaining time or waiter count.
    pub fn new(lease_id: LeaseId, token: FencingToken, meta: HolderMeta) -> Self {
        Self {
            lease_id,
            token,
            meta,
            remaining: None,
            waiters: None,
        }
    }

    /// Sets the remaining lease.
    #[must_use]
    pub fn remaining(mut self, remaining: Option<Duration>) -> Self {
        self.remaining = remaining;
        self
    }

    /// Sets the waiter count.
    #[must_use]
    pub fn waiters(mut self, waiters: Option<usize>) -> Self {
        self.waiters = waiters;
        self
    }
}

/// A store that can hold locks. Object-safe: use it as `Arc<dyn LockBackend>`.
#[async_trait]
pub trait LockBackend: Send + Sync + fmt::Debug + 'static {
    /// A short static name ("redis", "zk", ...), used in errors and metrics.
    fn name(&self) -> &'static str;

    /// What this backend can do, truthfully: the conformance suite selects its cases from it.
    fn capabilities(&self) -> Capabilities;

    /// One attempt to acquire: stores the request's [`LeaseId`], holder metadata and a lease
    /// of `ttl`, and issues a [`FencingToken`] strictly greater than every earlier one for
    /// the key in the same atomic step as the grant. [`LockError::Contended`] if another
    /// lease holds the key. A `ttl` outside [`check_lease`](crate::options::check_lease)'s
    /// range gets [`LockError::InvalidOptions`] before anything is sent (here, in
    /// [`LockBackend::acquire`] and in [`LockBackend::renew`]): callers may bypass the client.
    async fn try_acquire(&self, req: &AcquireRequest) -> Result<Grant, LockError>;

    /// Acquires, waiting until `deadline` (`None`: forever). The default polls
    /// [`LockBackend::try_acquire`] and waits in [`LockBackend::wait_for_change`] between
    /// attempts; override either where the store can queue or notify. Returns
    /// [`LockError::Timeout`] at the deadline and leaves nothing behind.
    async fn acquire(
        &self,
        req: &AcquireRequest,
        deadline: Option<Instant>,
    ) -> Result<Grant, LockError> {
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            match self.try_acquire(req).await {
                Err(LockError::Contended { .. }) => {}
                other => return other,
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(LockError::timeout(&req.key, now - started));
            }
            let mut pause = req.backoff.delay(attempt);
            if let Some(d) = deadline {
                pause = pause.min(d - now);
            }
            attempt = attempt.saturating_add(1);
            self.wait_for_change(&req.key, pause).await?;
        }
    }

    /// Returns when the key may have become free, or after `max` at the latest. The default
    /// just sleeps for `max`; backends with notifications return early on release.
    async fn wait_for_change(&self, key: &LockKey, max: Duration) -> Result<(), LockError> {
        let _ = key;
        tokio::time::sleep(max).await;
        Ok(())
    }

    /// Extends the lease to `ttl` from now if the store still holds `lease`; returns the new
    /// monotonic deadline measured from before the request was sent. Fails with
    /// [`LockError::NotHeld`] if the lease is gone. Must never create a lease. For a
    /// kept-alive session grant ([`Grant::kept_alive`]) it confirms the session and returns
    /// the deadline the server's limit gives (`ttl` is the limit).
    async fn renew(&self, lease: &LeaseRef, ttl: Duration) -> Result<Instant, LockError>;

    /// Removes `lease` (held, or waiting in a queue) and nothing else. Idempotent: a lease
    /// released twice or expired is [`ReleaseOutcome::NotHeld`], not an error. Also the
    /// clean-up after an acquire whose request may have reached the store.
    async fn release(&self, lease: &LeaseRef) -> Result<ReleaseOutcome, LockError>;

    /// The current holder of `key`, if any.
    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>, LockError>;
}

/// `fut` within `after` (from its first poll), or [`LockError::OperationTimeout`] naming
/// `backend` and `op`: the bound every store request gets.
pub async fn bounded<T>(
    backend: &'static str,
    op: &'static str,
    after: Duration,
    fut: impl std::future::Future<Output = Result<T, LockError>>,
) -> Result<T, LockError> {
    tokio::time::timeout(after, fut)
        .await
        .unwrap_or(Err(LockError::OperationTimeout { backend, op, after }))
}

/// Releases `lease`, each request bounded by `op`, retrying retryable failures (the store
/// unreachable for a moment, as in a failover) after `backoff` while a retry can start
/// within `op` of the first request.
pub(crate) async fn release_retrying(
    backend: &dyn LockBackend,
    lease: &LeaseRef,
    op: Duration,
    backoff: Backoff,
) -> Result<ReleaseOutcome, LockError> {
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        let delay = backoff.delay(attempt);
        match bounded(backend.name(), "release", op, backend.release(lease)).await {
            Err(e) if e.is_retryable() && started.elapsed() + delay < op => {
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}
