//! The client: acquire with a wait policy, cancellation safety, `with_lock`.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tracing::Instrument;

use crate::backend::{bounded, release_retrying};
use crate::backend::{AcquireRequest, Grant, LeaseRef, LockBackend, LockInfo};
use crate::error::LockError;
use crate::guard::{LockGuard, LockHandle, LockStatus};
use crate::key::{LeaseId, LockKey};
use crate::options::{LockOptions, WaitPolicy};

/// Acquires locks on any backend.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), lock_core::LockError> {
/// use lock_core::{LockClient, memory::MemoryStore};
/// let client = LockClient::new(MemoryStore::new().connect());
/// let guard = client.acquire("inventory:item-1").await?;
/// println!("holding with token {}", guard.token());
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct LockClient {
    backend: Arc<dyn LockBackend>,
    defaults: LockOptions,
}

impl LockClient {
    /// A client over `backend` with default options.
    pub fn new(backend: impl LockBackend) -> Self {
        Self::from_arc(Arc::new(backend))
    }

    /// A client over a shared backend.
    pub fn from_arc(backend: Arc<dyn LockBackend>) -> Self {
        Self {
            backend,
            defaults: LockOptions::default(),
        }
    }

    /// Replaces the default options used by [`LockClient::acquire`] and friends.
    #[must_use]
    pub fn with_options(mut self, defaults: LockOptions) -> Self {
        self.defaults = defaults;
        self
    }

    /// The default options.
    pub fn options(&self) -> &LockOptions {
        &self.defaults
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn LockBackend> {
        &self.backend
    }

    /// Acquires `key` with the default options (waiting per their wait policy).
    pub async fn acquire(&self, key: &str) -> Result<LockGuard, LockError> {
        self.acquire_with(key, &self.defaults).await
    }

    /// Acquires `key` without waiting: [`LockError::Contended`] if it is held.
    pub async fn try_acquire(&self, key: &str) -> Result<LockGuard, LockError> {
        let opts = self.defaults.clone().wait(WaitPolicy::NoWait);
        self.acquire_with(key, &opts).await
    }

    /// Acquires `key` with explicit options.
    ///
    /// Cancellation-safe: dropping the returned future at any point leaves no lease and no
    /// queue entry behind. The request runs in the caller's task (no hop through another
    /// task on the fast path); if the future is dropped before it has returned the guard,
    /// a background task releases whatever the request may have created, by the
    /// acquisition's lease id.
    pub async fn acquire_with(
        &self,
        key: &str,
        opts: &LockOptions,
    ) -> Result<LockGuard, LockError> {
        opts.validate()?;
        let key = LockKey::new(key)?;
        key.check_len(self.backend.capabilities().max_key_len)?;
        let backend = self.backend.clone();
        let name = backend.name();
        let req = AcquireRequest::new(key, opts.lease, opts.meta.clone(), opts.backoff);
        let started = Instant::now();
        let span = tracing::debug_span!("lock.acquire", backend = name, key = %req.key);
        // Armed while a request is in flight: a caller that goes away mid-request (its own
        // timeout, a select, a dropped task) cannot leave a lease or a queue entry behind.
        let pending = Pending {
            backend: Some(&backend),
            lease: Mutex::new(req.lease()),
            opts,
        };
        // The backend's own events belong to this span (entered on each poll, never held
        // across an await).
        let res = settle(&*backend, req, &pending, opts, started)
            .instrument(span.clone())
            .await;
        pending.disarm();
        let _enter = span.enter();
        let waited = started.elapsed().as_secs_f64();
        metrics::histogram!("lock_wait_seconds", "backend" => name).record(waited);
        let outcome = match &res {
            Ok(_) => "granted",
            Err(LockError::Contended { .. }) => "contended",
            Err(LockError::Timeout { .. }) => "timeout",
            Err(_) => "error",
        };
        metrics::counter!("lock_acquire_total", "backend" => name, "outcome" => outcome)
            .increment(1);
        match res {
            Ok((lease, grant)) => {
                tracing::debug!(token = %grant.token, lease = %lease.lease_id, waited, "granted");
                Ok(LockGuard::start(self.backend.clone(), lease, grant, opts))
            }
            Err(e) => {
                tracing::debug!(error = %e, "not granted");
                Err(e)
            }
        }
    }

    /// Runs `work` under the lock on `key` (default options), then releases it.
    ///
    /// `work` gets a [`LockHandle`] with the token (pass it to every fenced write) and the
    /// lost signal. Returns the closure's value, or [`LockError::Lost`] if the lock was lost
    /// while the closure ran (its value is then discarded: the fence decided what was
    /// written).
    pub async fn with_lock<F, Fut, T>(&self, key: &str, work: F) -> Result<T, LockError>
    where
        F: FnOnce(LockHandle) -> Fut,
        Fut: Future<Output = T>,
    {
        self.with_lock_opts(key, &self.defaults, work).await
    }

    /// [`LockClient::with_lock`] for fallible work: the closure's error and the lock's come
    /// back in one `Result`, in the closure's error type (which a [`LockError`] converts
    /// into). A lock lost while the closure ran is reported as [`LockError::Lost`], whatever
    /// the closure returned.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use lock_core::{LockClient, LockError, memory::MemoryStore};
    /// #[derive(Debug)]
    /// enum JobError { Lock(LockError), Parse(std::num::ParseIntError) }
    /// impl From<LockError> for JobError {
    ///     fn from(e: LockError) -> Self { JobError::Lock(e) }
    /// }
    /// let client = LockClient::new(MemoryStore::new().connect());
    /// let n: Result<u32, JobError> = client
    ///     .try_with_lock("job", |_lock| async { "42".parse::<u32>().map_err(JobError::Parse) })
    ///     .await;
    /// assert_eq!(n.unwrap(), 42);
    /// # }
    /// ```
    pub async fn try_with_lock<F, Fut, T, E>(&self, key: &str, work: F) -> Result<T, E>
    where
        F: FnOnce(LockHandle) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<LockError>,
    {
        self.with_lock(key, work).await?
    }

    /// [`LockClient::with_lock`] with explicit options.
    pub async fn with_lock_opts<F, Fut, T>(
        &self,
        key: &str,
        opts: &LockOptions,
        work: F,
    ) -> Result<T, LockError>
    where
        F: FnOnce(LockHandle) -> Fut,
        Fut: Future<Output = T>,
    {
        let guard = self.acquire_with(key, opts).await?;
        let handle = guard.handle();
        let value = work(handle.clone()).await;
        // Read before the release: a loss during the work wins over what the release says.
        let status = handle.status();
        let reason = match (status, guard.release().await) {
            (LockStatus::Lost(reason), _) => reason,
            (_, Ok(crate::ReleaseOutcome::Released)) => return Ok(value),
            (_, Ok(_)) => crate::LossReason::NotHeld,
            (_, Err(e)) => return Err(e),
        };
        Err(LockError::Lost {
            key: key.to_owned(),
            reason,
        })
    }

    /// Who holds `key`, without acquiring it.
    pub async fn inspect(&self, key: &str) -> Result<Option<LockInfo>, LockError> {
        let key = LockKey::new(key)?;
        key.check_len(self.backend.capabilities().max_key_len)?;
        let (name, op) = (self.backend.name(), self.defaults.op_timeout);
        bounded(name, "inspect", op, self.backend.inspect(&key)).await
    }
}

/// An acquire request in flight. Dropped while armed (the caller went away before the
/// backend answered, or before the caller saw the answer), it releases whatever the current
/// request may have created, by lease id, in a task of its own.
struct Pending<'a> {
    backend: Option<&'a Arc<dyn LockBackend>>,
    /// The lease of the request in flight (each retry has its own).
    lease: Mutex<LeaseRef>,
    opts: &'a LockOptions,
}

impl Pending<'_> {
    fn disarm(mut self) {
        self.backend = None;
    }

    fn set(&self, lease: LeaseRef) {
        *crate::lock(&self.lease) = lease;
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let Some(backend) = self.backend.take().cloned() else {
            return;
        };
        let lease = crate::lock(&self.lease).clone();
        let opts = self.opts.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { cleanup(&*backend, &lease, &opts).await });
            }
            Err(_) => {
                tracing::warn!(key = %lease.key, lease = %lease.lease_id, "an acquire was abandoned outside a runtime; its lease, if any, will expire");
            }
        }
    }
}

/// Releases what an abandoned or failed acquire may have left (a lease, a queue entry),
/// retrying for up to one operation timeout: a queue entry left behind would make later
/// waiters wait for it to expire.
async fn cleanup(backend: &dyn LockBackend, lease: &LeaseRef, opts: &LockOptions) {
    if release_retrying(backend, lease, opts.op_timeout, opts.backoff)
        .await
        .is_ok()
    {
        return;
    }
    tracing::warn!(key = %lease.key, lease = %lease.lease_id, "cleanup after an abandoned acquire failed; the lease will expire");
}

/// Runs the request, gives back late grants (retrying a waiting acquire after a backoff,
/// under a fresh lease id), and cleans up after an error that leaves the outcome unknown.
/// Returns the lease that was granted.
async fn settle(
    backend: &dyn LockBackend,
    mut req: AcquireRequest,
    pending: &Pending<'_>,
    opts: &LockOptions,
    started: Instant,
) -> Result<(LeaseRef, Grant), LockError> {
    let mut res = run_acquire(backend, &req, opts, started).await;
    let mut late = 0u32;
    while matches!(&res, Ok(g) if arrived_late(g, opts)) {
        // A grant whose reply took most of the lease to arrive (a slow network, a
        // paused client): the holder would have no time to use it, and the store may
        // already be handing the key on. Give it back; a waiting acquire tries again
        // after a backoff (whatever slowed the reply may still be there), within its
        // wait, as a new request: the give-back may still be on its way when the retry
        // is granted, and must not find the retry's lease.
        tracing::debug!(key = %req.key, "grant arrived with under a tenth of its lease left; given back");
        cleanup(backend, &req.lease(), opts).await;
        res = if matches!(opts.wait, WaitPolicy::NoWait) {
            Err(LockError::backend(
                backend.name(),
                true,
                "the grant arrived with under a tenth of its lease left (a slow reply or a paused client) and was given back",
            ))
        } else if opts_deadline(opts, started).is_some_and(|d| Instant::now() >= d) {
            Err(LockError::timeout(&req.key, started.elapsed()))
        } else {
            let mut pause = opts.backoff.delay(late);
            if let Some(d) = opts_deadline(opts, started) {
                pause = pause.min(d.saturating_duration_since(Instant::now()));
            }
            tokio::time::sleep(pause).await;
            late = late.saturating_add(1);
            req.lease_id = LeaseId::random();
            pending.set(req.lease());
            run_acquire(backend, &req, opts, started).await
        };
    }
    match res {
        Ok(grant) => Ok((req.lease(), grant)),
        Err(e) => {
            // Errors that leave the outcome unknown may have created a lease or a queue
            // entry: remove it before answering, so the caller sees a clean slate. A
            // `Timeout` is definite: the backend contract has it leave nothing behind.
            let unknown = !matches!(
                e,
                LockError::Contended { .. }
                    | LockError::Timeout { .. }
                    | LockError::InvalidKey { .. }
                    | LockError::InvalidOptions(_)
                    | LockError::InvalidConfig(_)
            );
            if unknown {
                cleanup(backend, &req.lease(), opts).await;
            }
            Err(e)
        }
    }
}

/// The end of a waiting acquire's wait, if it has one.
fn opts_deadline(opts: &LockOptions, started: Instant) -> Option<Instant> {
    match opts.wait {
        WaitPolicy::Timeout(t) => Some(started + t),
        _ => None,
    }
}

/// Whether a grant has under a tenth of its lease left (after the drift margin) on
/// arrival.
fn arrived_late(grant: &Grant, opts: &LockOptions) -> bool {
    let len = grant.lease_len(opts.lease);
    grant.lease_deadline.is_some_and(|d| {
        d.checked_sub(crate::options::drift_for(len))
            .is_none_or(|safe| safe < Instant::now() + len / 10)
    })
}

/// The request itself, bounded by the wait policy plus one operation timeout.
async fn run_acquire(
    backend: &dyn LockBackend,
    req: &AcquireRequest,
    opts: &LockOptions,
    started: Instant,
) -> Result<Grant, LockError> {
    let (deadline, limit) = match opts.wait {
        WaitPolicy::NoWait => (None, Some(opts.op_timeout)),
        WaitPolicy::Timeout(t) => (Some(started + t), Some(t.saturating_add(opts.op_timeout))),
        WaitPolicy::Forever => (None, None),
    };
    let fut = async {
        match opts.wait {
            WaitPolicy::NoWait => backend.try_acquire(req).await,
            _ => backend.acquire(req, deadline).await,
        }
    };
    match limit {
        Some(l) => bounded(backend.name(), "acquire", l, fut).await,
        None => fut.await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::memory::MemoryStore;
    use tokio::time::timeout;

    /// Fallible work: its error comes back as it is, unnested, and the lock is released.
    #[tokio::test]
    async fn try_with_lock_returns_the_works_error_and_releases() {
        #[derive(Debug, PartialEq)]
        enum E {
            Lock(String),
            Work,
        }
        impl From<LockError> for E {
            fn from(e: LockError) -> Self {
                E::Lock(e.to_string())
            }
        }
        let client = LockClient::new(MemoryStore::new().connect())
            .with_options(LockOptions::default().wait(WaitPolicy::NoWait));
        let r: Result<(), E> = client.try_with_lock("k", |_| async { Err(E::Work) }).await;
        assert_eq!(r, Err(E::Work));
        let g = client
            .try_acquire("k")
            .await
            .expect("released after the work failed");
        let r: Result<(), E> = client.try_with_lock("k", |_| async { Ok(()) }).await;
        assert!(matches!(r, Err(E::Lock(_))), "{r:?}");
        g.release().await.expect("release");
    }

    /// The grant lands in the channel, then the caller drops its future without reading
    /// it (as a caller's own timeout can, between two polls): the lease must be released,
    /// not left to expire.
    #[tokio::test]
    async fn unread_grant_is_released() {
        let store = MemoryStore::new();
        let client = LockClient::new(store.connect());
        let opts = LockOptions::default()
            .lease(Duration::from_secs(30))
            .wait(WaitPolicy::Timeout(Duration::from_secs(10)));
        let first = client.acquire_with("k", &opts).await.expect("first");
        let mut waiting = Box::pin(client.acquire_with("k", &opts));
        assert!(timeout(Duration::from_millis(20), &mut waiting)
            .await
            .is_err());
        first.release().await.expect("release");
        // Let the acquire task receive the grant and send it; the caller never reads it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(waiting);
        let mut free = false;
        for _ in 0..50 {
            match client.try_acquire("k").await {
                Ok(g) => {
                    g.release().await.expect("release");
                    free = true;
                    break;
                }
                Err(LockError::Contended { .. }) => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(free, "the unread grant was left to expire (30 s lease)");
    }

    /// While renewals fail, `check()` says `Uncertain` (not `Lost`: the lease may still
    /// run), and `Ok` again once a renewal gets through.
    #[tokio::test]
    async fn check_reports_uncertain_until_a_renewal_gets_through() {
        let backend = MemoryStore::new().connect();
        let client = LockClient::new(backend.clone());
        let opts = LockOptions::default()
            .lease(Duration::from_secs(30))
            .renew_every(Duration::from_millis(50));
        let g = client.acquire_with("k", &opts).await.expect("acquire");
        g.check().expect("held");
        backend.pause_renewals(true);
        let mut seen = None;
        for _ in 0..200 {
            match g.check() {
                Ok(()) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => {
                    seen = Some(e);
                    break;
                }
            }
        }
        assert!(
            matches!(&seen, Some(LockError::Uncertain { key }) if key == "k"),
            "check() while renewals fail: {seen:?}"
        );
        backend.pause_renewals(false);
        let mut back = false;
        for _ in 0..200 {
            if g.check().is_ok() {
                back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(back, "check() stayed failing after renewals resumed");
        g.release().await.expect("release");
    }

    /// Hands out grants whose reply "arrived" with the lease nearly over, `late` times.
    #[derive(Debug)]
    struct LateReplies {
        inner: crate::memory::MemoryBackend,
        late: std::sync::atomic::AtomicUsize,
        acquires: std::sync::atomic::AtomicUsize,
    }

    impl LateReplies {
        fn delay(&self, mut g: Grant) -> Grant {
            use std::sync::atomic::Ordering::SeqCst;
            self.acquires.fetch_add(1, SeqCst);
            if self.late.load(SeqCst) > 0 {
                self.late.fetch_sub(1, SeqCst);
                g.lease_deadline = Some(Instant::now() + Duration::from_millis(5));
            }
            g
        }
    }

    #[async_trait::async_trait]
    impl LockBackend for LateReplies {
        fn name(&self) -> &'static str {
            "late"
        }
        fn capabilities(&self) -> crate::Capabilities {
            self.inner.capabilities()
        }
        async fn try_acquire(&self, req: &AcquireRequest) -> Result<Grant, LockError> {
            self.inner.try_acquire(req).await.map(|g| self.delay(g))
        }
        async fn acquire(
            &self,
            req: &AcquireRequest,
            deadline: Option<Instant>,
        ) -> Result<Grant, LockError> {
            self.inner
                .acquire(req, deadline)
                .await
                .map(|g| self.delay(g))
        }
        async fn renew(&self, lease: &LeaseRef, ttl: Duration) -> Result<Instant, LockError> {
            self.inner.renew(lease, ttl).await
        }
        async fn release(&self, lease: &LeaseRef) -> Result<crate::ReleaseOutcome, LockError> {
            self.inner.release(lease).await
        }
        async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>, LockError> {
            self.inner.inspect(key).await
        }
    }

    /// A backend whose release waits for `gate`.
    #[derive(Debug)]
    struct GatedRelease {
        inner: crate::memory::MemoryBackend,
        gate: Arc<tokio::sync::Notify>,
    }

    #[async_trait::async_trait]
    impl LockBackend for GatedRelease {
        fn name(&self) -> &'static str {
            "gated"
        }
        fn capabilities(&self) -> crate::Capabilities {
            self.inner.capabilities()
        }
        async fn try_acquire(&self, req: &AcquireRequest) -> Result<Grant, LockError> {
            self.inner.try_acquire(req).await
        }
        async fn acquire(
            &self,
            req: &AcquireRequest,
            deadline: Option<Instant>,
        ) -> Result<Grant, LockError> {
            self.inner.acquire(req, deadline).await
        }
        async fn renew(&self, lease: &LeaseRef, ttl: Duration) -> Result<Instant, LockError> {
            self.inner.renew(lease, ttl).await
        }
        async fn release(&self, lease: &LeaseRef) -> Result<crate::ReleaseOutcome, LockError> {
            self.gate.notified().await;
            self.inner.release(lease).await
        }
        async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>, LockError> {
            self.inner.inspect(key).await
        }
    }

    /// A release waiting on its store leaves no span entered on the thread: other tasks
    /// running there meanwhile must not log inside `lock.release`.
    #[test]
    fn a_pending_release_leaves_no_span_entered() {
        let subscriber = tracing_subscriber::registry();
        tracing::subscriber::with_default(subscriber, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let gate = Arc::new(tokio::sync::Notify::new());
                let client = LockClient::new(GatedRelease {
                    inner: MemoryStore::new().connect(),
                    gate: gate.clone(),
                });
                let g = client.acquire("k").await.expect("acquire");
                assert!(tracing::Span::current().is_none());
                let release = tokio::spawn(g.release());
                for _ in 0..10 {
                    tokio::task::yield_now().await;
                }
                assert!(
                    !release.is_finished(),
                    "the release should wait on its gate"
                );
                let current = tracing::Span::current();
                assert!(
                    current.is_none(),
                    "span {:?} left entered by a pending release",
                    current.metadata().map(|m| m.name())
                );
                gate.notify_one();
                let outcome = release.await.expect("join").expect("release");
                assert_eq!(outcome, crate::ReleaseOutcome::Released);
                assert!(tracing::Span::current().is_none());
            });
        });
    }

    /// Late grants given back in a row are retried after a growing backoff, not at once:
    /// whatever slowed the replies may still be there.
    #[tokio::test(start_paused = true)]
    async fn late_grants_are_retried_after_a_backoff() {
        use std::sync::atomic::Ordering::SeqCst;
        let backend = Arc::new(LateReplies {
            inner: MemoryStore::new().connect(),
            late: 3.into(),
            acquires: 0.into(),
        });
        let client = LockClient::from_arc(backend.clone());
        let min = Duration::from_millis(100);
        let opts = LockOptions::default()
            .lease(Duration::from_secs(30))
            .backoff(crate::Backoff::new(min, Duration::from_secs(1)))
            .wait(WaitPolicy::Forever);
        let started = Instant::now();
        let g = client.acquire_with("k", &opts).await.expect("fourth try");
        assert_eq!(backend.acquires.load(SeqCst), 4);
        assert!(
            started.elapsed() >= 3 * min,
            "three retries took {:?}, under three backoffs",
            started.elapsed()
        );
        g.release().await.expect("release");
    }

    /// A grant that arrives with its lease nearly over is given back: a waiting acquire
    /// tries again and gets a fresh lease; a try reports a retryable error and leaves the
    /// key free.
    #[tokio::test]
    async fn late_grant_is_given_back() {
        use std::sync::atomic::Ordering::SeqCst;
        let backend = Arc::new(LateReplies {
            inner: MemoryStore::new().connect(),
            late: 1.into(),
            acquires: 0.into(),
        });
        let client = LockClient::from_arc(backend.clone());
        let opts = LockOptions::default()
            .lease(Duration::from_secs(30))
            .wait(WaitPolicy::Timeout(Duration::from_secs(5)));
        let g = client.acquire_with("k", &opts).await.expect("second try");
        assert_eq!(backend.acquires.load(SeqCst), 2);
        assert!(g.safe_until().expect("ttl") > Instant::now() + Duration::from_secs(20));
        g.release().await.expect("release");

        backend.late.store(1, SeqCst);
        match client.try_acquire("k").await {
            Err(e) => assert!(e.is_retryable(), "{e}"),
            Ok(_) => panic!("a late grant was handed to the caller"),
        }
        let again = client
            .try_acquire("k")
            .await
            .expect("the late grant was given back");
        again.release().await.expect("release");
    }
}
