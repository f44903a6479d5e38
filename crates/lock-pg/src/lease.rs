//! Lease-row locks: a table of leases whose expiry is judged on the server's clock.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Object;
use lock_core::backend::bounded;
use lock_core::{
    AcquireRequest, Capabilities, Grant, HolderMeta, LeaseId, LeaseKind, LeaseRef, LockBackend,
    LockError, LockInfo, LockKey, ReleaseOutcome,
};
use tokio::time::Instant;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement};

use crate::handoff::{Release, Waiter};
use crate::shared::Shared;
use crate::sql::{self, map_err, ms};

const NAME: &str = "pg-lease";

/// A lock backend on lease rows, made by [`PgLocks::lease_rows`](crate::PgLocks::lease_rows).
///
/// Every operation is one statement on a pooled connection, so no connection is held while
/// a lock is held: it works behind transaction-pooling proxies (PgBouncer in transaction
/// mode). Acquire takes a free or expired row and issues the token in one transaction;
/// expiry is judged by `clock_timestamp()` on the server. Renewal extends the row; release
/// marks it free and sends a notification that wakes this key's waiters (one per process;
/// within a process waiters take turns), with polling bounded by the holder's remaining
/// lease and `poll_max` as the fallback for a holder that died or a lost notification.
///
/// When this process has a waiter for the key, a release hands the row straight to it in
/// the same statement (its lease and a new token begin as the holder's ends), at most four
/// times in a row per key: the release after that goes through the server, so that other
/// processes' waiters get their chance. The mode is not fair (FIFO) across processes.
#[derive(Clone, Debug)]
pub struct PgLeaseBackend {
    shared: Arc<Shared>,
}

/// An acquire statement on the wire. Dropped before its answer (the caller gave up), it
/// releases the lease on the same connection: statements on one connection run in order,
/// so the release runs after the grant commits. The caller's own clean-up may go out on
/// another pooled connection and reach the server first, finding nothing to release.
struct Unanswered {
    conn: Option<Object>,
    release: Statement,
    shared: Arc<Shared>,
    lease: LeaseRef,
}

impl Unanswered {
    fn answered(mut self) {
        self.conn = None;
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let (shared, lease, stmt) = (
            self.shared.clone(),
            self.lease.clone(),
            self.release.clone(),
        );
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            // Sent at the first poll, behind the acquire; the answer may wait for it.
            let (key, id) = (lease.key.as_str(), lease.lease_id.as_str());
            let params: [&(dyn ToSql + Sync); 2] = [&key, &id];
            let release = conn.query(&stmt, &params);
            match tokio::time::timeout(shared.cfg.op_timeout, release).await {
                Ok(Ok(rows)) if !rows.is_empty() => shared.released_here(&lease.key),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "releasing an abandoned grant failed; it expires")
                }
                Err(_) => tracing::debug!("releasing an abandoned grant timed out; it expires"),
            }
        });
    }
}

enum Attempt {
    Granted(Grant),
    Held(Option<Duration>),
}

impl PgLeaseBackend {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// One prepared statement on a pooled connection, bounded by the operation timeout.
    async fn query(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, LockError> {
        bounded(NAME, op, self.shared.cfg.op_timeout, async {
            let conn = self.shared.conn(None).await?;
            let stmt = conn.prepare_cached(sql).await.map_err(map_err)?;
            conn.query(&stmt, params).await.map_err(map_err)
        })
        .await
    }

    async fn attempt(&self, req: &AcquireRequest) -> Result<Attempt, LockError> {
        self.shared.ready().await?;
        let sent = Instant::now();
        let rows = bounded(NAME, "acquire", self.shared.cfg.op_timeout, async {
            let conn = self.shared.conn(None).await?;
            // Prepared before the acquire goes out: a give-back must not wait for a
            // Parse whose answer queues behind the acquire.
            let release = conn
                .prepare_cached(&self.shared.sql.lease_release)
                .await
                .map_err(map_err)?;
            let stmt = conn
                .prepare_cached(&self.shared.sql.lease_acquire)
                .await
                .map_err(map_err)?;
            let mut unanswered = Unanswered {
                conn: None,
                release,
                shared: self.shared.clone(),
                lease: req.lease(),
            };
            let conn = unanswered.conn.insert(conn);
            let params: [&(dyn ToSql + Sync); 4] = [
                &req.key.as_str(),
                &req.lease_id.as_str(),
                &req.meta.encode(),
                &ms(req.ttl),
            ];
            let rows = conn.query(&stmt, &params).await.map_err(map_err);
            unanswered.answered();
            rows
        })
        .await?;
        let Some(row) = rows.first() else {
            // Another client's grant committed while the statement ran.
            return Ok(Attempt::Held(None));
        };
        let token: Option<i64> = row.try_get(0).map_err(map_err)?;
        let remaining: Option<i64> = row.try_get(1).map_err(map_err)?;
        match token {
            Some(t) => Ok(Attempt::Granted(Grant::ttl(sql::token(t)?, sent + req.ttl))),
            None => {
                Ok(Attempt::Held(remaining.map(|r| {
                    Duration::from_millis(u64::try_from(r).unwrap_or(0))
                })))
            }
        }
    }

    /// Frees `id`'s row of `key`; true if that lease was live and is now released.
    async fn release_row(&self, key: &LockKey, id: &LeaseId) -> Result<bool, LockError> {
        let rows = self
            .query(
                "release",
                &self.shared.sql.lease_release,
                &[&key.as_str(), &id.as_str()],
            )
            .await?;
        Ok(rows.len() == 1)
    }

    /// Releases `lease` by handing the row to this process's waiter `w`, in one statement.
    async fn hand_off(&self, lease: &LeaseRef, w: Waiter) -> Result<ReleaseOutcome, LockError> {
        let sent = Instant::now();
        let res = self
            .query(
                "release",
                &self.shared.sql.lease_handoff,
                &[
                    &lease.key.as_str(),
                    &lease.lease_id.as_str(),
                    &w.lease_id.as_str(),
                    &w.meta,
                    &ms(w.ttl),
                ],
            )
            .await;
        let rows = match res {
            Ok(rows) => rows,
            Err(e) => {
                // Unknown whether the row changed hands. The waiter tries again with its
                // lease id, which takes the row back at once if it did.
                w.tell(None);
                return Err(e);
            }
        };
        let Some(row) = rows.first() else {
            // This lease had ended: nothing changed.
            w.tell(None);
            return Ok(ReleaseOutcome::NotHeld);
        };
        let token = match row
            .try_get::<_, i64>(0)
            .map_err(map_err)
            .and_then(sql::token)
        {
            Ok(t) => t,
            Err(e) => {
                // The row is the waiter's; its next attempt takes it (same lease id).
                tracing::warn!(error = %e, "unreadable token from a hand-off");
                w.tell(None);
                return Ok(ReleaseOutcome::Released);
            }
        };
        let ttl = w.ttl;
        let waiter = w.lease_id.clone();
        if !w.tell(Some(Grant::ttl(token, sent + ttl))) {
            // The waiter gave up while the statement ran: give its grant back.
            match self.release_row(&lease.key, &waiter).await {
                Ok(_) => self.shared.released_here(&lease.key),
                Err(e) => tracing::debug!(
                    error = %e,
                    "giving back a hand-off whose waiter left failed; it expires"
                ),
            }
            self.shared.handoffs.released(&lease.key);
        }
        Ok(ReleaseOutcome::Released)
    }
}

#[async_trait]
impl LockBackend for PgLeaseBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(LeaseKind::Ttl).notify_waits(true)
    }

    async fn try_acquire(&self, req: &AcquireRequest) -> Result<Grant, LockError> {
        lock_core::options::check_lease("lease", req.ttl)?;
        match self.attempt(req).await? {
            Attempt::Granted(g) => Ok(g),
            Attempt::Held(_) => Err(LockError::contended(&req.key)),
        }
    }

    async fn acquire(
        &self,
        req: &AcquireRequest,
        deadline: Option<Instant>,
    ) -> Result<Grant, LockError> {
        lock_core::options::check_lease("lease", req.ttl)?;
        let started = Instant::now();
        let _turn = self.shared.queues.turn(&req.key, started, deadline).await?;
        let released = self.shared.released(&req.key).await;
        loop {
            // Armed before the attempt, so a release between the attempt and the wait is
            // not missed.
            let notified = released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let left = match self.attempt(req).await? {
                Attempt::Granted(g) => return Ok(g),
                Attempt::Held(left) => left,
            };
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(LockError::timeout(&req.key, now - started));
            }
            let mut pause = self.shared.cfg.poll_max;
            if let Some(l) = left {
                pause = pause.min(l + Duration::from_millis(1));
            }
            if let Some(d) = deadline {
                pause = pause.min(d - now);
            }
            // A release in this process may hand the row straight to this waiter.
            let mut offer =
                self.shared
                    .handoffs
                    .offer(&req.key, &req.lease_id, req.meta.encode(), req.ttl);
            tokio::select! {
                handed = offer.handed() => match handed {
                    Some(g) => return Ok(g),
                    None => continue,
                },
                _ = &mut notified => {}
                _ = tokio::time::sleep(pause) => {}
            }
            if !offer.withdraw() {
                // A release took the offer and its statement is running: its answer
                // decides. At the deadline the offer is dropped, and a grant made for
                // this waiter is given back by the releaser (this waiter must not try
                // again with its lease id then, or the give-back would end its grant).
                let answer = match deadline {
                    Some(d) => tokio::time::timeout_at(d, offer.handed()).await.ok(),
                    None => Some(offer.handed().await),
                };
                match answer {
                    Some(Some(g)) => return Ok(g),
                    Some(None) => {}
                    None => return Err(LockError::timeout(&req.key, started.elapsed())),
                }
            }
        }
    }

    async fn renew(&self, lease: &LeaseRef, ttl: Duration) -> Result<Instant, LockError> {
        lock_core::options::check_lease("lease", ttl)?;
        let sent = Instant::now();
        let n = self
            .query(
                "renew",
                &self.shared.sql.lease_renew,
                &[&lease.key.as_str(), &lease.lease_id.as_str(), &ms(ttl)],
            )
            .await?
            .len();
        if n == 1 {
            Ok(sent + ttl)
        } else {
            Err(LockError::NotHeld {
                key: lease.key.to_string(),
            })
        }
    }

    async fn release(&self, lease: &LeaseRef) -> Result<ReleaseOutcome, LockError> {
        let wake_here = match self.shared.handoffs.take(&lease.key) {
            Release::Direct(w) => return self.hand_off(lease, w).await,
            Release::Server => true,
            Release::Yield => false,
        };
        let released = self.release_row(&lease.key, &lease.lease_id).await?;
        self.shared.handoffs.released(&lease.key);
        Ok(if released {
            if wake_here {
                self.shared.released_here(&lease.key);
            }
            ReleaseOutcome::Released
        } else {
            ReleaseOutcome::NotHeld
        })
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>, LockError> {
        self.shared.ready().await?;
        let rows = self
            .query("inspect", &self.shared.sql.lease_inspect, &[&key.as_str()])
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let lease: String = row.try_get(0).map_err(map_err)?;
        let token: i64 = row.try_get(1).map_err(map_err)?;
        let meta: String = row.try_get(2).map_err(map_err)?;
        let left: i64 = row.try_get(3).map_err(map_err)?;
        Ok(Some(
            LockInfo::new(
                LeaseId::parse(&lease)?,
                sql::token(token)?,
                HolderMeta::decode(&meta),
            )
            .remaining(Some(Duration::from_millis(
                u64::try_from(left).unwrap_or(0),
            ))),
        ))
    }
}
