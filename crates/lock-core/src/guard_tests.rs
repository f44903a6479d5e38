//! The guard's lifecycle under the races a real network produces: replies that arrive late
//! or out of order, a runtime that stalls, a release still in flight when the next
//! request goes out. Each wrapper below changes one thing about the in-memory backend.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::{sleep, Instant};

use crate::backend::{AcquireRequest, Grant, LeaseRef, LockBackend, LockInfo, ReleaseOutcome};
use crate::memory::{MemoryBackend, MemoryStore};
use crate::options::drift_for;
use crate::{Capabilities, LockClient, LockError, LockKey, LockOptions, LockStatus, WaitPolicy};

/// What a wrapper does around the store's `renew` and `release`.
#[derive(Debug, Default)]
struct Plan {
    /// `renew` is applied at once, its reply arrives this much later.
    renew_reply_delay: Duration,
    /// `renew(ttl)`, per asked ttl: how long before the store applies it, and how long
    /// after that its reply arrives.
    renew_delays: Vec<(Duration, Duration, Duration)>,
    /// `release` reaches the store only after this long, even if its caller gave up.
    release_delay: Duration,
    /// The first this many grants arrive with their lease nearly over.
    late_grants: AtomicUsize,
}

#[derive(Debug)]
struct Wrapped {
    inner: MemoryBackend,
    plan: Plan,
    renewals: AtomicUsize,
}

impl Wrapped {
    fn new(inner: MemoryBackend, plan: Plan) -> Arc<Self> {
        Arc::new(Self {
            inner,
            plan,
            renewals: AtomicUsize::new(0),
        })
    }

    /// Like Redis and PostgreSQL lease rows, an attempt under the lease id that holds the
    /// key is granted again (its earlier answer may have been lost).
    async fn held_by(&self, req: &AcquireRequest) -> Option<Grant> {
        let info = self.inner.inspect(&req.key).await.ok().flatten()?;
        (info.lease_id == req.lease_id).then(|| {
            Grant::ttl(
                info.token,
                Instant::now() + info.remaining.unwrap_or_default(),
            )
        })
    }

    fn late(&self, mut g: Grant) -> Grant {
        if self
            .plan
            .late_grants
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            g.lease_deadline = Some(Instant::now() + Duration::from_millis(5));
        }
        g
    }
}

#[async_trait]
impl LockBackend for Wrapped {
    fn name(&self) -> &'static str {
        "wrapped"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn try_acquire(&self, req: &AcquireRequest) -> Result<Grant, LockError> {
        if let Some(g) = self.held_by(req).await {
            return Ok(self.late(g));
        }
        self.inner.try_acquire(req).await.map(|g| self.late(g))
    }
    async fn acquire(
        &self,
        req: &AcquireRequest,
        deadline: Option<Instant>,
    ) -> Result<Grant, LockError> {
        if let Some(g) = self.held_by(req).await {
            return Ok(self.late(g));
        }
        self.inner
            .acquire(req, deadline)
            .await
            .map(|g| self.late(g))
    }
    async fn renew(&self, lease: &LeaseRef, ttl: Duration) -> Result<Instant, LockError> {
        self.renewals.fetch_add(1, SeqCst);
        let sent = Instant::now();
        let (apply, reply) = self
            .plan
            .renew_delays
            .iter()
            .find(|(t, _, _)| *t == ttl)
            .map_or((Duration::ZERO, self.plan.renew_reply_delay), |d| {
                (d.1, d.2)
            });
        sleep(apply).await;
        let r = self.inner.renew(lease, ttl).await;
        sleep(reply).await;
        // The deadline a real backend reports: measured from before the request went out.
        r.map(|_| sent + ttl)
    }
    async fn release(&self, lease: &LeaseRef) -> Result<ReleaseOutcome, LockError> {
        let (inner, lease, d) = (self.inner.clone(), lease.clone(), self.plan.release_delay);
        // A request on the wire reaches the store whether or not its caller still waits.
        let applied = tokio::spawn(async move {
            sleep(d).await;
            inner.release(&lease).await
        });
        applied
            .await
            .unwrap_or_else(|e| Err(LockError::backend("wrapped", true, e)))
    }
    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>, LockError> {
        self.inner.inspect(key).await
    }
}

/// A renewal whose reply arrives after the runtime stalled past the safe deadline: once
/// `status()` has said Lost, nothing may keep the lease alive on the store, and the key
/// is given back.
#[test]
fn no_renewal_after_lost() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = MemoryStore::new();
        let backend = Wrapped::new(
            store.connect(),
            Plan {
                renew_reply_delay: Duration::from_millis(20),
                ..Plan::default()
            },
        );
        let lease = Duration::from_millis(300);
        let client = LockClient::from_arc(backend.clone()).with_options(
            LockOptions::default()
                .lease(lease)
                .renew_every(Duration::from_millis(100)),
        );
        let g = client.acquire("k").await.expect("acquire");
        // The first renewal goes out at 100 ms and is applied at once (the store's lease now
        // ends at 400 ms); its reply is due 20 ms later, but the only thread stalls until
        // 330 ms, past the guard's safe deadline (295 ms).
        sleep(Duration::from_millis(110)).await;
        std::thread::sleep(Duration::from_millis(220));
        assert!(
            matches!(g.status(), LockStatus::Lost(_)),
            "status after the stall: {:?}",
            g.status()
        );
        // Several renewal periods later the store must not hold the lease any more.
        sleep(Duration::from_millis(700)).await;
        let other = LockClient::new(store.connect());
        let held = other.inspect("k").await.expect("inspect");
        assert!(
            held.is_none(),
            "the store still holds the lease 700 ms after status() said Lost ({} renewals)",
            backend.renewals.load(SeqCst)
        );
        drop(g);
    });
}

/// Two renewals of one guard in flight at once, applied in one order and answered in the
/// other: the guard must never believe a deadline the store does not hold.
#[tokio::test]
async fn concurrent_extends_never_overstate_the_deadline() {
    let store = MemoryStore::new();
    let long = Duration::from_secs(5);
    let short = Duration::from_millis(300);
    let backend = Wrapped::new(
        store.connect(),
        Plan {
            // The long extend is applied first but answered last, 100 ms later; the short
            // one is applied 20 ms after it and answered at once.
            renew_delays: vec![
                (long, Duration::ZERO, Duration::from_millis(100)),
                (short, Duration::from_millis(20), Duration::ZERO),
            ],
            ..Plan::default()
        },
    );
    let client = LockClient::from_arc(backend.clone())
        .with_options(LockOptions::default().lease(Duration::from_secs(2)));
    let g = client.acquire("k").await.expect("acquire");
    let (slow_reply, fast) = tokio::join!(g.extend(long), async {
        sleep(Duration::from_millis(1)).await;
        g.extend(short).await
    });
    slow_reply.expect("long extend");
    fast.expect("short extend");
    let safe = g.safe_until().expect("ttl lock");
    let info = client.inspect("k").await.expect("inspect").expect("held");
    let store_left = info.remaining.expect("remaining");
    let guard_left = safe.saturating_duration_since(Instant::now());
    assert!(
        guard_left <= store_left,
        "the guard believes {guard_left:?} are left, the store holds {store_left:?}"
    );
    g.release().await.expect("release");
}

/// The lease that `extend` sets is the one that the automatic renewal keeps.
#[tokio::test]
async fn extend_sets_the_lease_renewals_keep() {
    let store = MemoryStore::new();
    let client = LockClient::new(store.connect())
        .with_options(LockOptions::default().lease(Duration::from_millis(300)));
    let g = client.acquire("k").await.expect("acquire");
    g.extend(Duration::from_secs(3)).await.expect("extend");
    // Renewals run several times meanwhile (every 100 ms for the 300 ms lease, every
    // second for the 3 s one).
    sleep(Duration::from_millis(1500)).await;
    let left = client
        .inspect("k")
        .await
        .expect("inspect")
        .expect("held")
        .remaining
        .expect("remaining");
    assert!(
        left > Duration::from_millis(1200),
        "after renewals the store holds {left:?}: the renewal went back to the 300 ms lease"
    );
    g.release().await.expect("release");
}

/// A grant given back because it arrived late, whose give-back is still on the wire when
/// the acquire tries again: the retry's grant must survive that release.
#[tokio::test]
async fn a_retried_late_grant_survives_the_earlier_give_back() {
    let store = MemoryStore::new();
    let backend = Wrapped::new(
        store.connect(),
        Plan {
            release_delay: Duration::from_millis(300),
            late_grants: AtomicUsize::new(1),
            ..Plan::default()
        },
    );
    let client = LockClient::from_arc(backend).with_options(
        LockOptions::default()
            .lease(Duration::from_secs(10))
            .op_timeout(Duration::from_millis(100))
            .wait(WaitPolicy::Timeout(Duration::from_secs(5))),
    );
    let g = client.acquire("k").await.expect("acquire");
    // The give-back lands 300 ms after it was sent, long after the retry was granted.
    sleep(Duration::from_millis(500)).await;
    let info = LockClient::new(store.connect())
        .inspect("k")
        .await
        .expect("inspect");
    assert_eq!(g.status(), LockStatus::Held);
    assert!(
        info.as_ref().is_some_and(|i| i.lease_id == *g.lease_id()),
        "the guard says Held but the store holds {info:?}"
    );
    drop(g);
}

/// A renewal period that leaves no room before the safe deadline is refused up front.
#[test]
fn renew_every_must_leave_room_before_the_deadline() {
    let lease = Duration::from_secs(1);
    let o = LockOptions::default().lease(lease);
    let drift = drift_for(o.lease);
    for every in [
        lease - drift,
        lease - drift / 2,
        lease - Duration::from_millis(1),
    ] {
        assert!(
            matches!(
                o.clone().renew_every(every).validate(),
                Err(LockError::InvalidOptions(_))
            ),
            "renew_every {every:?} with a {lease:?} lease was accepted"
        );
    }
    assert!(o.renew_every(lease / 2).validate().is_ok());
}

/// An extend to a shorter lease that the store applies but whose answer never arrives: the
/// guard must assume the shorter lease, not keep the longer deadline it knew.
#[tokio::test]
async fn a_shorter_extend_whose_answer_is_lost_shortens_the_deadline() {
    let store = MemoryStore::new();
    let short = Duration::from_millis(200);
    let backend = Wrapped::new(
        store.connect(),
        Plan {
            renew_delays: vec![(short, Duration::ZERO, Duration::from_secs(30))],
            ..Plan::default()
        },
    );
    let client = LockClient::from_arc(backend).with_options(
        LockOptions::default()
            .lease(Duration::from_secs(30))
            .op_timeout(Duration::from_millis(100)),
    );
    let g = client.acquire("k").await.expect("acquire");
    let mut w = g.watch();
    let before = g.safe_until().expect("ttl lock");
    assert!(g.extend(short).await.is_err(), "the answer never came");
    sleep(short).await;
    assert!(
        matches!(g.status(), LockStatus::Lost(_)),
        "the store's lease ended, yet the guard says {:?} (safe for {:?} more)",
        g.status(),
        before.saturating_duration_since(Instant::now())
    );
    // Watchers learn it then too, not at the renewal due under the longer lease.
    let seen = tokio::time::timeout(
        Duration::from_secs(3),
        w.wait_for(|s| matches!(s, LockStatus::Lost(_))),
    )
    .await;
    assert!(matches!(seen, Ok(Ok(_))), "no Lost published");
}

/// A release whose answer never comes back in time, though the store applies it: once
/// the release went out, nothing of the guard may say Held, whether it was given back by
/// `release()` or by dropping the guard, and whoever holds a handle sees it.
#[tokio::test]
async fn a_handle_never_says_held_once_the_release_went_out() {
    for dropped in [false, true] {
        let store = MemoryStore::new();
        let backend = Wrapped::new(
            store.connect(),
            Plan {
                release_delay: Duration::from_millis(300),
                ..Plan::default()
            },
        );
        let client = LockClient::from_arc(backend).with_options(
            LockOptions::default()
                .lease(Duration::from_secs(30))
                .op_timeout(Duration::from_millis(100)),
        );
        let g = client.acquire("k").await.expect("acquire");
        let handle = g.handle();
        if dropped {
            drop(g);
        } else {
            assert!(g.release().await.is_err(), "the answer came too late");
        }
        sleep(Duration::from_millis(400)).await;
        let other = LockClient::new(store.connect())
            .try_acquire("k")
            .await
            .expect("the store applied the release");
        assert!(
            handle.status() != LockStatus::Held && handle.check().is_err(),
            "dropped {dropped}: another client holds the key (token {}), the old handle says {:?}",
            other.token(),
            handle.status()
        );
        other.release().await.expect("release");
    }
}
