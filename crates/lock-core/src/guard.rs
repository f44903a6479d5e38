//! The guard of a held lock: its token, its status, renewal and release.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, Instant};
use tracing::Instrument;

use crate::backend::{
    bounded, release_retrying, Grant, LeaseRef, LockBackend, ReleaseOutcome, SessionHealth,
};
use crate::error::{LockError, LossReason};
use crate::keeper::{Scheduler, Ticket};
use crate::key::{LeaseId, LockKey};
use crate::lock;
use crate::options::{drift_for, LockOptions};
use crate::token::FencingToken;

/// The state of a lock the caller was granted.
///
/// `Held -> Uncertain -> Held` may repeat; `Lost` and `Released` are final.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LockStatus {
    /// Held: the last renewal (or the session) confirms it.
    Held,
    /// Renewals are failing, the session is suspended, or a release is on its way: the
    /// store may still hold the lock, or may not. Stop starting new work; the fence still
    /// protects writes.
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

/// How the guard keeps its lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keep {
    /// A TTL lease, renewed automatically (or only watched, with renewal off).
    Ttl { auto: bool },
    /// A session with a server-side limit, confirmed on the backend's schedule; the length
    /// is fixed by the server, so `extend` does not apply.
    Confirmed,
    /// A session the backend reports on, with the deadline its last report gave.
    Session,
}

/// The lease the guard keeps: when it is safe until, how long a renewal asks for, when the
/// next renewal is due.
#[derive(Debug)]
struct Lease {
    safe_until: Option<Instant>,
    len: Duration,
    every: Duration,
    next: Instant,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) backend: Arc<dyn LockBackend>,
    pub(crate) lease: LeaseRef,
    pub(crate) token: FencingToken,
    status: watch::Sender<LockStatus>,
    state: Mutex<Lease>,
    safe_changed: Notify,
    /// One renewal at a time (automatic or `extend`): a reply can only describe the last
    /// request the store applied.
    renewing: tokio::sync::Mutex<()>,
    keep: Keep,
    pub(crate) opts: LockOptions,
    granted_at: Instant,
    keeper: Mutex<Keeper>,
    /// A release went out: nothing may say Held again (a renewal answered meanwhile).
    release_sent: std::sync::atomic::AtomicBool,
}

/// The guard's background work: renewal (TTL) or the session watch.
#[derive(Debug)]
enum Keeper {
    /// Nothing to do (no deadline, no session), or stopped.
    Idle,
    /// The renewal task starts when its first renewal comes due (see `keeper.rs`).
    Scheduled(Ticket),
    Running(JoinHandle<()>),
}

impl Shared {
    /// Starts the renewal task now, if it is still only scheduled.
    fn start_keeper(sh: &Arc<Shared>) {
        let mut k = lock(&sh.keeper);
        if let Keeper::Scheduled(_) = &*k {
            if let Keeper::Scheduled(ticket) = std::mem::replace(&mut *k, Keeper::Idle) {
                ticket.cancel();
            }
            *k = Keeper::Running(tokio::spawn(keep_alive(sh.clone())));
        }
    }

    /// Stops the background work; returns the task if one was running.
    fn stop_keeper(&self) -> Option<JoinHandle<()>> {
        match std::mem::replace(&mut *lock(&self.keeper), Keeper::Idle) {
            Keeper::Scheduled(ticket) => {
                ticket.cancel();
                None
            }
            Keeper::Running(task) => Some(task),
            Keeper::Idle => None,
        }
    }

    /// Sets a non-final status; returns false if the status was already final.
    fn set_status(&self, new: LockStatus) -> bool {
        let backend = self.backend.name();
        self.status.send_if_modified(|cur| {
            let releasing = self.release_sent.load(std::sync::atomic::Ordering::SeqCst);
            if cur.is_final() || *cur == new || (releasing && new == LockStatus::Held) {
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
        })
    }

    /// A release is on its way: the store may let go at any moment, so no handle may say
    /// Held any more (quietly: this is the normal end of a lock).
    fn releasing(&self) {
        self.release_sent
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.status.send_if_modified(|cur| {
            let change = *cur == LockStatus::Held;
            if change {
                *cur = LockStatus::Uncertain;
            }
            change
        });
    }

    /// What a release answered, for the handles still watching.
    fn released(&self, outcome: &ReleaseOutcome) {
        self.set_status(match outcome {
            ReleaseOutcome::Released => LockStatus::Released,
            _ => LockStatus::Lost(LossReason::NotHeld),
        });
    }

    /// Declares the lock lost (final): renewal stops at once and the lease is given back,
    /// best effort, so that nothing this guard started can keep the key.
    fn lose(sh: &Arc<Self>, reason: LossReason) {
        if !sh.set_status(LockStatus::Lost(reason)) {
            return;
        }
        if let Some(task) = sh.stop_keeper() {
            // From inside the keeper itself this only marks it: it returns right after.
            task.abort();
        }
        sh.safe_changed.notify_waiters();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let sh = sh.clone();
            rt.spawn(async move {
                let _ = sh.release_once().await;
            });
        }
    }

    fn safe_until(&self) -> Option<Instant> {
        lock(&self.state).safe_until
    }

    /// One release request, within the operation timeout.
    async fn release_once(&self) -> Result<ReleaseOutcome, LockError> {
        let op = self.opts.op_timeout;
        bounded(
            self.backend.name(),
            "release",
            op,
            self.backend.release(&self.lease),
        )
        .await
    }

    /// A renewal (or extend) confirmed the lease until `deadline`; `len` is the lease it
    /// asked for, `sent` when it was sent.
    fn renewed(&self, deadline: Instant, len: Duration, sent: Instant) {
        {
            let mut st = lock(&self.state);
            st.safe_until = Some(deadline.checked_sub(drift_for(len)).unwrap_or(deadline));
            if st.len != len {
                st.len = len;
                st.every = match self.keep {
                    Keep::Confirmed => st.every,
                    _ => self.opts.renewal_period_for(len),
                };
            }
            st.next = sent + st.every;
        }
        self.safe_changed.notify_waiters();
    }

    /// A request that would end the lease at `deadline` may have reached the store: the
    /// lock is safe until that deadline at most.
    fn may_have_shortened(&self, deadline: Instant, len: Duration) {
        let shorter = deadline.checked_sub(drift_for(len)).unwrap_or(deadline);
        {
            let mut st = lock(&self.state);
            if st.safe_until.is_some_and(|s| shorter < s) {
                st.safe_until = Some(shorter);
            }
        }
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
        if !s.is_final() && self.safe_until().is_some_and(|d| Instant::now() >= d) {
            Shared::lose(&self.shared, LossReason::Expired);
            return self.status.borrow().clone();
        }
        s
    }

    /// A receiver that sees every status change.
    pub fn watch(&self) -> watch::Receiver<LockStatus> {
        self.status.clone()
    }

    /// Until when the lock is safe to act on, on the monotonic clock: the lease deadline
    /// measured from before the (last successful) request was sent, minus a drift margin;
    /// for a session lock (ZooKeeper), the deadline the backend's last confirmation of the
    /// session gave. `None` only for a backend that reports no deadline.
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
            LockStatus::Held => Ok(()),
            LockStatus::Lost(reason) => Err(LockError::Lost { key, reason }),
            LockStatus::Released => Err(LockError::NotHeld { key }),
            LockStatus::Uncertain => Err(LockError::Uncertain { key }),
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
                seen = rx.wait_for(LockStatus::is_final) => {
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

/// A held lock. It derefs to its [`LockHandle`]: `guard.token()`, `guard.status()`,
/// `guard.check()`, `guard.lost()`, `guard.safe_until()`.
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
        grant: Grant,
        opts: &LockOptions,
    ) -> Self {
        let (tx, rx) = watch::channel(LockStatus::Held);
        let opts = opts.clone();
        let len = grant.lease_len(opts.lease);
        let (keep, every) = match (&grant.keepalive, &grant.session) {
            (Some(k), _) => (Keep::Confirmed, k.every),
            (None, Some(_)) => (Keep::Session, opts.renewal_period()),
            (None, None) => (
                Keep::Ttl {
                    auto: opts.auto_renew,
                },
                opts.renewal_period(),
            ),
        };
        let safe_until = match (&grant.lease_deadline, &grant.session) {
            (Some(d), _) => Some(d.checked_sub(drift_for(len)).unwrap_or(*d)),
            (None, Some(session)) => match *session.borrow() {
                SessionHealth::Alive { until } => Some(until),
                _ => None,
            },
            (None, None) => None,
        };
        let now = Instant::now();
        let shared = Arc::new(Shared {
            backend,
            lease,
            token: grant.token,
            status: tx,
            state: Mutex::new(Lease {
                safe_until,
                len,
                every,
                next: now + every,
            }),
            safe_changed: Notify::new(),
            renewing: tokio::sync::Mutex::new(()),
            keep,
            opts,
            granted_at: now,
            keeper: Mutex::new(Keeper::Idle),
            release_sent: std::sync::atomic::AtomicBool::new(false),
        });
        {
            // Held while scheduling: an entry that comes due at once finds itself stored.
            let mut k = lock(&shared.keeper);
            *k = match (grant.session, safe_until) {
                (Some(session), _) => {
                    Keeper::Running(tokio::spawn(watch_session(shared.clone(), session)))
                }
                (None, Some(safe)) => {
                    let due = match keep {
                        Keep::Ttl { auto: false } => safe,
                        _ => (now + every).min(safe),
                    };
                    match Scheduler::current() {
                        Some(sched) => {
                            let weak = Arc::downgrade(&shared);
                            Keeper::Scheduled(sched.schedule(
                                due,
                                Box::new(move |_| {
                                    if let Some(sh) = weak.upgrade() {
                                        Shared::start_keeper(&sh);
                                    }
                                }),
                            ))
                        }
                        // Not reachable from the async acquire; without a runtime nothing
                        // renews.
                        None => Keeper::Idle,
                    }
                }
                (None, None) => Keeper::Idle,
            };
        }
        Self {
            handle: LockHandle { shared, status: rx },
            done: false,
        }
    }

    /// A cloneable view of this lock (token, status, lost signal).
    pub fn handle(&self) -> LockHandle {
        self.handle.clone()
    }

    /// Extends the lease to `lease` from now (TTL backends), and makes it the lease that
    /// automatic renewal keeps from then on (renewing every third of it, or `renew_every`
    /// if that is shorter than the new lease minus its drift margin). Fails with
    /// [`LockError::NotHeld`] (and the guard turns `Lost`) if the store no longer holds this
    /// lease; [`LockError::Unsupported`] for locks whose session is the lease.
    pub async fn extend(&self, lease: Duration) -> Result<(), LockError> {
        let sh = &self.handle.shared;
        crate::options::check_lease("extend to", lease)?;
        if !matches!(sh.keep, Keep::Ttl { .. }) {
            return Err(LockError::no_lease_to_extend(sh.backend.name()));
        }
        let _turn = sh.renewing.lock().await;
        // Lost and released are final; an uncertain lock may still be extended.
        if let Err(e @ (LockError::Lost { .. } | LockError::NotHeld { .. })) = self.check() {
            return Err(e);
        }
        let key = self.key().to_string();
        let safe = sh.safe_until();
        let sent = Instant::now();
        let budget = safe.map_or(sh.opts.op_timeout, |s| {
            sh.opts.op_timeout.min(s.saturating_duration_since(sent))
        });
        let res = bounded(
            sh.backend.name(),
            "renew",
            budget,
            sh.backend.renew(&sh.lease, lease),
        )
        .await;
        if safe.is_some_and(|s| Instant::now() >= s) {
            // Confirmed too late: the lock was no longer safe while the request was out.
            Shared::lose(sh, LossReason::Expired);
            return Err(LockError::Lost {
                key,
                reason: LossReason::Expired,
            });
        }
        match res {
            Ok(deadline) => {
                sh.renewed(deadline, lease, sent);
                sh.set_status(LockStatus::Held);
                // A renewal schedule made for the old lease starts now, on the new one.
                Shared::start_keeper(sh);
                Ok(())
            }
            Err(e @ LockError::NotHeld { .. }) => {
                Shared::lose(sh, LossReason::NotHeld);
                Err(e)
            }
            Err(e) => {
                // The store may have applied it without the answer arriving: a shorter
                // lease then ends sooner than the one the guard knew.
                sh.may_have_shortened(sent + lease, lease);
                sh.set_status(LockStatus::Uncertain);
                // A renewal still only scheduled must wake at the shorter deadline, so that
                // watchers see Lost there.
                Shared::start_keeper(sh);
                Err(e)
            }
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
        // With no receiver but this guard's own (no handle or watch given out), nobody can
        // see a Released status: skip the channel then.
        let watched = sh.status.receiver_count() > 1;
        sh.releasing();
        let span = tracing::debug_span!("lock.release", backend = sh.backend.name(), key = %sh.lease.key, token = %sh.token);
        // Entered on each poll (`instrument`), never held across an await.
        let (op, backoff) = (sh.opts.op_timeout, sh.opts.backoff);
        let res = release_retrying(&*sh.backend, &sh.lease, op, backoff)
            .instrument(span.clone())
            .await;
        let _enter = span.enter();
        metrics::histogram!("lock_hold_seconds", "backend" => sh.backend.name())
            .record(sh.granted_at.elapsed().as_secs_f64());
        match &res {
            Ok(ReleaseOutcome::Released) if !watched => {}
            Ok(outcome) => sh.released(outcome),
            Err(e) => tracing::warn!(error = %e, "release failed; the lease will expire"),
        }
        res
    }
}

impl std::ops::Deref for LockGuard {
    type Target = LockHandle;
    fn deref(&self) -> &LockHandle {
        &self.handle
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
        sh.releasing();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    match sh.release_once().await {
                        Ok(outcome) => sh.released(&outcome),
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

/// Keeps a lease alive (or, with renewal off, watches its deadline). Marks the lock
/// `Uncertain` while renewals fail and `Lost` when the safe deadline passes, which is
/// before the store's own expiry by the drift margin. A renewal answered after the safe
/// deadline does not count: by then the lock was already not safe to act on.
async fn keep_alive(sh: Arc<Shared>) {
    let auto = !matches!(sh.keep, Keep::Ttl { auto: false });
    let mut last_error: Option<String> = None;
    loop {
        let changed = sh.safe_changed.notified();
        let (safe, next, every, len) = {
            let st = lock(&sh.state);
            (st.safe_until, st.next, st.every, st.len)
        };
        let Some(safe) = safe else { return };
        if sh.status.borrow().is_final() {
            return;
        }
        let wake = if auto { next.min(safe) } else { safe };
        tokio::select! {
            _ = sleep_until(wake) => {}
            _ = changed => continue,
        }
        if Instant::now() >= safe {
            let reason = match last_error.take() {
                Some(e) => LossReason::RenewalFailed(e),
                None => LossReason::Expired,
            };
            Shared::lose(&sh, reason);
            return;
        }
        if !auto || Instant::now() < next {
            continue;
        }
        let Ok(turn) = tokio::time::timeout_at(safe, sh.renewing.lock()).await else {
            Shared::lose(&sh, LossReason::Expired);
            return;
        };
        if lock(&sh.state).safe_until != Some(safe) {
            // `extend` moved the lease while this waited its turn: start over from it.
            continue;
        }
        let retry = (every / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let sent = Instant::now();
        // Bounded by the period too, so a renewal that hangs raises Uncertain well before
        // the safe deadline instead of at it.
        let budget = sh.opts.op_timeout.min(every).min(safe - sent);
        let renewed = timeout(budget, sh.backend.renew(&sh.lease, len)).await;
        if sh.status.borrow().is_final() {
            return;
        }
        if Instant::now() >= safe {
            drop(turn);
            Shared::lose(&sh, LossReason::Expired);
            return;
        }
        match renewed {
            Ok(Ok(deadline)) => {
                sh.renewed(deadline, len, sent);
                sh.set_status(LockStatus::Held);
                last_error = None;
                tracing::trace!(key = %sh.lease.key, "renewed");
            }
            Ok(Err(LockError::NotHeld { .. })) => {
                drop(turn);
                Shared::lose(&sh, LossReason::NotHeld);
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
                lock(&sh.state).next = Instant::now() + retry;
            }
        }
    }
}

/// Mirrors a session backend's health into the lock status.
async fn watch_session(sh: Arc<Shared>, mut session: watch::Receiver<SessionHealth>) {
    loop {
        let health = session.borrow_and_update().clone();
        match health {
            SessionHealth::Alive { until } => {
                lock(&sh.state).safe_until = Some(until);
                sh.safe_changed.notify_waiters();
                sh.set_status(LockStatus::Held);
            }
            SessionHealth::Suspended => {
                sh.set_status(LockStatus::Uncertain);
            }
            SessionHealth::Ended(reason) => {
                Shared::lose(&sh, reason);
                return;
            }
        }
        if session.changed().await.is_err() {
            Shared::lose(
                &sh,
                LossReason::SessionEnded("the backend stopped reporting the session".into()),
            );
            return;
        }
    }
}
