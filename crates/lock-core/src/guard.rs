//! The guard of a held lock: its token, its status, renewal and release.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, Instant};
use tracing::Instrument;

use crate::backend::{LeaseRef, LockBackend, ReleaseOutcome, SessionHealth};
use crate::error::{LockError, LossReason};
use crate::keeper::{Scheduler, Ticket};
use crate::key::{LeaseId, LockKey};
use crate::options::LockOptions;
use crate::token::FencingToken;

/// The state of a lock the caller was granted.
///
/// `Held -> Uncertain -> Held` may repeat; `Lost` and `Released` are final.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LockStatus {
    /// Held: the last renewal (or the session) confirms it.
    Held,
    /// Renewals are failing or the session is suspended: the store may still hold the
    /// lock, or may not. Stop starting new work; the fence still protects writes.
    Uncertain,
    /// The lock is gone.
    Lost(LossReason),
    /// Released by this holder.
    Released,
}

impl LockStatus {
    fn is_final(&self) -> bool {
        matches!(self, Self::Lost(_) | Self::Released)
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) backend: Arc<dyn LockBackend>,
    pub(crate) lease: LeaseRef,
    pub(crate) token: FencingToken,
    status: watch::Sender<LockStatus>,
    safe_until: Mutex<Option<Instant>>,
    safe_changed: Notify,
    pub(crate) opts: LockOptions,
    granted_at: Instant,
    keeper: Mutex<Keeper>,
    /// A session channel whose watch is scheduled but not started yet.
    session: Mutex<Option<watch::Receiver<SessionHealth>>>,
}

/// What the scheduler runs when a guard's background work comes due.
fn starter(sh: &Arc<Shared>) -> crate::keeper::Starter {
    let weak = Arc::downgrade(sh);
    Box::new(move |now| {
        if let Some(sh) = weak.upgrade() {
            Shared::start_keeper(&sh, now);
        }
    })
}

/// The guard's background work: renewal (TTL) or the session watch.
#[derive(Debug)]
enum Keeper {
    /// Nothing to do (no deadline, no session).
    Idle,
    /// The renewal task starts when its first renewal comes due (see `keeper.rs`).
    Scheduled(Ticket),
    Running(JoinHandle<()>),
    Stopped,
}

impl Shared {
    /// Starts the renewal task now, if it is still only scheduled; its first renewal is
    /// due at `first`.
    pub(crate) fn start_keeper(sh: &Arc<Shared>, first: Instant) {
        let mut k = sh.keeper.lock().unwrap_or_else(|p| p.into_inner());
        if let Keeper::Scheduled(_) = &*k {
            if let Keeper::Scheduled(ticket) = std::mem::replace(&mut *k, Keeper::Stopped) {
                ticket.cancel();
            }
            let session = sh.session.lock().unwrap_or_else(|p| p.into_inner()).take();
            *k = Keeper::Running(match session {
                Some(session) => tokio::spawn(watch_session(sh.clone(), session)),
                None => tokio::spawn(keep_alive(sh.clone(), first)),
            });
        }
    }

    /// Stops the background work; returns the task if one was running.
    fn stop_keeper(&self) -> Option<JoinHandle<()>> {
        let mut k = self.keeper.lock().unwrap_or_else(|p| p.into_inner());
        match std::mem::replace(&mut *k, Keeper::Stopped) {
            Keeper::Scheduled(ticket) => {
                ticket.cancel();
                None
            }
            Keeper::Running(task) => Some(task),
            Keeper::Idle | Keeper::Stopped => None,
        }
    }

    fn set_status(&self, new: LockStatus) {
        let backend = self.backend.name();
        self.status.send_if_modified(|cur| {
            if cur.is_final() || *cur == new {
                return false;
            }
            match &new {
                LockStatus::Lost(reason) => {
                    tracing::warn!(backend, key = %self.lease.key, token = %self.token, %reason, "lock lost");
                    metrics::counter!("lock_lost_total", "backend" => backend).increment(1);
                }
                LockStatus::Uncertain => {
                    tracing::warn!(backend, key = %self.lease.key, token = %self.token, "lock uncertain");
                }
                _ => {}
            }
            *cur = new;
            true
        });
    }

    fn safe_until(&self) -> Option<Instant> {
        *self.safe_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_safe_until(&self, lease_deadline: Instant) {
        let safe = lease_deadline
            .checked_sub(self.opts.drift())
            .unwrap_or(lease_deadline);
        *self.safe_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(safe);
        self.safe_changed.notify_waiters();
    }
}

/// A cheap, cloneable view of a held lock: its token, status and lost signal. Handed to the
/// closure of [`LockClient::with_lock`](crate::LockClient::with_lock).
#[derive(Clone, Debug)]
pub struct LockHandle {
    shared: Arc<Shared>,
    status: watch::Receiver<LockStatus>,
}

impl LockHandle {
    /// The key.
    pub fn key(&self) -> &LockKey {
        &self.shared.lease.key
    }

    /// The fencing token of this grant: pass it to every write on the protected resource.
    pub fn token(&self) -> FencingToken {
        self.shared.token
    }

    /// This acquisition's lease id.
    pub fn lease_id(&self) -> &LeaseId {
        &self.shared.lease.lease_id
    }

    /// The current status. Judged on the monotonic clock as well as from the renewal
    /// task: once the safe deadline has passed, the lock is `Lost` even if that task has
    /// not been scheduled yet (a starved runtime, a paused process that just woke up).
    pub fn status(&self) -> LockStatus {
        let s = self.status.borrow().clone();
        if matches!(s, LockStatus::Held | LockStatus::Uncertain)
            && self.safe_until().is_some_and(|d| Instant::now() >= d)
        {
            self.shared
                .set_status(LockStatus::Lost(LossReason::Expired));
            return self.status.borrow().clone();
        }
        s
    }

    /// A receiver that sees every status change.
    pub fn watch(&self) -> watch::Receiver<LockStatus> {
        self.status.clone()
    }

    /// Until when the lock is safe to act on, on the monotonic clock: the lease deadline
    /// measured from before the (last successful) request was sent, minus a drift margin.
    /// `None` for session-based locks (they are safe while the status is `Held`).
    pub fn safe_until(&self) -> Option<Instant> {
        self.shared.safe_until()
    }

    /// `Ok` if the status is `Held` and the safe deadline has not passed;
    /// [`LockError::Uncertain`] while the store has not confirmed the lock lately (it may
    /// still be held: stop starting new work), [`LockError::Lost`] once it is gone, and
    /// [`LockError::NotHeld`] after release.
    pub fn check(&self) -> Result<(), LockError> {
        let key = self.key().to_string();
        match self.status() {
            LockStatus::Held => {}
            LockStatus::Lost(reason) => return Err(LockError::Lost { key, reason }),
            LockStatus::Released => return Err(LockError::NotHeld { key }),
            LockStatus::Uncertain => return Err(LockError::Uncertain { key }),
        }
        match self.safe_until() {
            Some(s) if Instant::now() >= s => Err(LockError::Lost {
                key,
                reason: LossReason::Expired,
            }),
            _ => Ok(()),
        }
    }

    /// Resolves when the lock is lost (or released), with the reason; at the latest when
    /// the safe deadline passes without a renewal.
    pub async fn lost(&self) -> Option<LossReason> {
        let mut rx = self.status.clone();
        loop {
            let changed = self.shared.safe_changed.notified();
            let deadline = self.safe_until();
            let wait_deadline = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                seen = rx.wait_for(|s| s.is_final()) => {
                    return match seen.as_deref() {
                        Ok(LockStatus::Lost(r)) => Some(r.clone()),
                        _ => None,
                    };
                }
                () = wait_deadline => {
                    // status() turns Lost if the (current) deadline really passed.
                    if let LockStatus::Lost(r) = self.status() {
                        return Some(r);
                    }
                }
                () = changed => {}
            }
        }
    }
}

/// A held lock.
///
/// Release it with [`LockGuard::release`]: only that reports failure. Dropping the guard
/// spawns a best-effort release on the current Tokio runtime (or, without one, leaves the
/// lease to expire) and never blocks. Neither Drop nor release makes a paused holder safe:
/// the **fencing token**, checked by the resource, does.
#[must_use = "dropping the guard releases the lock in the background"]
#[derive(Debug)]
pub struct LockGuard {
    handle: LockHandle,
    done: bool,
}

impl LockGuard {
    pub(crate) fn start(
        backend: Arc<dyn LockBackend>,
        lease: LeaseRef,
        grant: crate::backend::Grant,
        opts: &LockOptions,
    ) -> Self {
        let (tx, rx) = watch::channel(LockStatus::Held);
        // The guard keeps what renewal and release need, not the holder metadata (the
        // store has it): no string copied per grant.
        let opts = LockOptions {
            lease: opts.lease,
            wait: opts.wait,
            auto_renew: opts.auto_renew,
            renew_every: opts.renew_every,
            backoff: opts.backoff,
            op_timeout: opts.op_timeout,
            meta: crate::key::HolderMeta::default(),
        };
        // Set here, not through `set_safe_until`: nobody can wait on a guard not yet made.
        let safe_until = grant
            .lease_deadline
            .map(|d| d.checked_sub(opts.drift()).unwrap_or(d));
        let now = Instant::now();
        let shared = Arc::new(Shared {
            backend,
            lease,
            token: grant.token,
            status: tx,
            safe_until: Mutex::new(safe_until),
            safe_changed: Notify::new(),
            opts,
            granted_at: now,
            keeper: Mutex::new(Keeper::Idle),
            session: Mutex::new(None),
        });
        let keeper = match (grant.lease_deadline, grant.session) {
            (_, Some(session)) => match (grant.session_quiet_until, Scheduler::current()) {
                // Nothing to mirror before then: watch from then on (see `keeper.rs`).
                (Some(at), Some(sched)) if at > now => {
                    *shared.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(session);
                    Keeper::Scheduled(sched.schedule(at, starter(&shared)))
                }
                _ => Keeper::Running(tokio::spawn(watch_session(shared.clone(), session))),
            },
            (Some(deadline), None) => {
                let safe = safe_until.unwrap_or(deadline);
                let due = if shared.opts.auto_renew {
                    (now + shared.opts.renewal_period()).min(safe)
                } else {
                    safe
                };
                match Scheduler::current() {
                    Some(sched) => Keeper::Scheduled(sched.schedule(due, starter(&shared))),
                    // Not reachable from the async acquire; without a runtime nothing renews.
                    None => Keeper::Idle,
                }
            }
            (None, None) => Keeper::Idle,
        };
        *shared.keeper.lock().unwrap_or_else(|p| p.into_inner()) = keeper;
        Self {
            handle: LockHandle { shared, status: rx },
            done: false,
        }
    }

    /// A cloneable view of this lock (token, status, lost signal).
    pub fn handle(&self) -> LockHandle {
        self.handle.clone()
    }

    /// The key.
    pub fn key(&self) -> &LockKey {
        self.handle.key()
    }

    /// The fencing token of this grant.
    pub fn token(&self) -> FencingToken {
        self.handle.token()
    }

    /// This acquisition's lease id.
    pub fn lease_id(&self) -> &LeaseId {
        self.handle.lease_id()
    }

    /// The current status.
    pub fn status(&self) -> LockStatus {
        self.handle.status()
    }

    /// See [`LockHandle::safe_until`].
    pub fn safe_until(&self) -> Option<Instant> {
        self.handle.safe_until()
    }

    /// See [`LockHandle::check`].
    pub fn check(&self) -> Result<(), LockError> {
        self.handle.check()
    }

    /// See [`LockHandle::lost`].
    pub async fn lost(&self) -> Option<LossReason> {
        self.handle.lost().await
    }

    /// A receiver that sees every status change.
    pub fn watch(&self) -> watch::Receiver<LockStatus> {
        self.handle.watch()
    }

    /// Extends the lease to `lease` from now (TTL backends), independent of automatic
    /// renewal. Fails with [`LockError::NotHeld`] (and the guard turns `Lost`) if the store
    /// no longer holds this lease.
    pub async fn extend(&self, lease: Duration) -> Result<(), LockError> {
        let sh = &self.handle.shared;
        if lease.is_zero() || lease > crate::options::MAX_LEASE {
            return Err(LockError::InvalidOptions(format!(
                "extend by {lease:?} is out of range"
            )));
        }
        if let LockStatus::Lost(reason) = self.status() {
            return Err(LockError::Lost {
                key: self.key().to_string(),
                reason,
            });
        }
        let res = bounded(sh, "renew", sh.backend.renew(&sh.lease, lease)).await;
        match res {
            Ok(deadline) => {
                sh.set_safe_until(deadline);
                sh.set_status(LockStatus::Held);
                // The schedule was made for the old deadline: start renewing from here.
                Shared::start_keeper(sh, Instant::now() + sh.opts.renewal_period());
                Ok(())
            }
            Err(e @ LockError::NotHeld { .. }) => {
                sh.set_status(LockStatus::Lost(LossReason::NotHeld));
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Releases the lock: stops renewal first (so no renewal can follow the release), then
    /// removes the lease if the store still holds it. Retryable failures are retried within
    /// the operation timeout. [`ReleaseOutcome::NotHeld`] means the lease had already
    /// expired or been taken over.
    pub async fn release(mut self) -> Result<ReleaseOutcome, LockError> {
        self.done = true;
        if let Some(keeper) = self.handle.shared.stop_keeper() {
            keeper.abort();
            let _ = keeper.await;
        }
        let sh = self.handle.shared.clone();
        let span = tracing::debug_span!("lock.release", backend = sh.backend.name(), key = %sh.lease.key, token = %sh.token);
        let started = Instant::now();
        let mut attempt = 0;
        // The span is entered on each poll (`instrument`), never held across an await: a
        // held `Entered` guard would leave it entered on the worker thread while other
        // tasks run there.
        let res = async {
            loop {
                match bounded(&sh, "release", sh.backend.release(&sh.lease)).await {
                    Err(e) if e.is_retryable() && started.elapsed() < sh.opts.op_timeout => {
                        tokio::time::sleep(sh.opts.backoff.delay(attempt)).await;
                        attempt += 1;
                    }
                    other => break other,
                }
            }
        }
        .instrument(span.clone())
        .await;
        let _enter = span.enter();
        metrics::histogram!("lock_hold_seconds", "backend" => sh.backend.name())
            .record(sh.granted_at.elapsed().as_secs_f64());
        match &res {
            // With no receiver but this guard's own (no handle or watch given out), nobody
            // can see the final status: skip waking the channel's listeners.
            Ok(ReleaseOutcome::Released) if sh.status.receiver_count() <= 1 => {}
            Ok(ReleaseOutcome::Released) => sh.set_status(LockStatus::Released),
            Ok(_) => {
                sh.set_status(LockStatus::Lost(LossReason::NotHeld));
            }
            Err(e) => tracing::warn!(error = %e, "release failed; the lease will expire"),
        }
        res
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(keeper) = self.handle.shared.stop_keeper() {
            keeper.abort();
        }
        let sh = self.handle.shared.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    match bounded(&sh, "release", sh.backend.release(&sh.lease)).await {
                        Ok(_) => sh.set_status(LockStatus::Released),
                        Err(e) => tracing::warn!(key = %sh.lease.key, error = %e, "background release failed; the lease will expire"),
                    }
                });
            }
            Err(_) => tracing::warn!(
                key = %sh.lease.key,
                "lock guard dropped outside a Tokio runtime; the lease will expire"
            ),
        }
    }
}

async fn bounded<T>(
    sh: &Shared,
    op: &'static str,
    fut: impl std::future::Future<Output = Result<T, LockError>>,
) -> Result<T, LockError> {
    match timeout(sh.opts.op_timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(LockError::OperationTimeout {
            backend: sh.backend.name(),
            op,
            after: sh.opts.op_timeout,
        }),
    }
}

/// Keeps a TTL lease alive (or, with renewal off, watches its deadline). Marks the lock
/// `Uncertain` while renewals fail and `Lost` when the safe deadline passes, which is
/// before the store's own expiry by the drift margin.
async fn keep_alive(sh: Arc<Shared>, first: Instant) {
    let period = sh.opts.renewal_period();
    let retry = (period / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut next = first;
    let mut last_error: Option<String> = None;
    loop {
        let Some(safe) = sh.safe_until() else { return };
        let changed = sh.safe_changed.notified();
        let wake = if sh.opts.auto_renew {
            next.min(safe)
        } else {
            safe
        };
        tokio::select! {
            _ = sleep_until(wake) => {}
            _ = changed => continue,
        }
        let now = Instant::now();
        let safe = sh.safe_until().unwrap_or(now);
        if now >= safe {
            let reason = match last_error.take() {
                Some(e) => LossReason::RenewalFailed(e),
                None => LossReason::Expired,
            };
            sh.set_status(LockStatus::Lost(reason));
            return;
        }
        if !sh.opts.auto_renew || now < next {
            continue;
        }
        // Bounded by the period too, so a renewal that hangs raises Uncertain well before
        // the safe deadline instead of at it.
        let budget = sh.opts.op_timeout.min(period).min(safe - now);
        let renewed = timeout(budget, sh.backend.renew(&sh.lease, sh.opts.lease)).await;
        match renewed {
            Ok(Ok(deadline)) => {
                sh.set_safe_until(deadline);
                sh.set_status(LockStatus::Held);
                last_error = None;
                next = now + period;
                tracing::trace!(key = %sh.lease.key, "renewed");
            }
            Ok(Err(LockError::NotHeld { .. })) => {
                sh.set_status(LockStatus::Lost(LossReason::NotHeld));
                return;
            }
            failed => {
                let msg = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("renewal got no answer within {budget:?}"),
                };
                metrics::counter!("lock_renewal_failures_total", "backend" => sh.backend.name())
                    .increment(1);
                tracing::debug!(key = %sh.lease.key, error = %msg, "renewal failed");
                last_error = Some(msg);
                sh.set_status(LockStatus::Uncertain);
                next = Instant::now() + retry;
            }
        }
    }
}

/// Mirrors a session backend's health into the lock status.
async fn watch_session(sh: Arc<Shared>, mut session: watch::Receiver<SessionHealth>) {
    loop {
        let health = session.borrow_and_update().clone();
        match health {
            SessionHealth::Alive => sh.set_status(LockStatus::Held),
            SessionHealth::Suspended => sh.set_status(LockStatus::Uncertain),
            SessionHealth::Ended(reason) => {
                sh.set_status(LockStatus::Lost(reason));
                return;
            }
        }
        if session.changed().await.is_err() {
            sh.set_status(LockStatus::Lost(LossReason::SessionEnded(
                "the backend stopped reporting the session".into(),
            )));
            return;
        }
    }
}
