//! Session advisory locks and transaction-scoped advisory locks, each on a connection held
//! for the life of the lock. The session (or transaction) is the lease.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Object;
use lock_core::{
    AcquireRequest, Capabilities, FencingToken, Grant, HolderMeta, LeaseId, LeaseKind, LeaseRef,
    LockBackend, LockError, LockInfo, LockKey, LossReason, ReleaseOutcome, SessionHealth,
};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::NoTls;

use crate::shared::Shared;
use crate::sql::{advisory_id, advisory_lock_parts, is_lock_timeout, map_err};

/// Which advisory lock a [`PgSessionBackend`] takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// `pg_advisory_lock`: held until unlocked or the connection ends.
    Session,
    /// `pg_advisory_xact_lock` inside a transaction the backend opens; release commits.
    Transaction,
}

/// A lock backend on PostgreSQL advisory locks, holding one connection per held lock.
///
/// Made by [`PgLocks::advisory`](crate::PgLocks::advisory) (session-level locks) or
/// [`PgLocks::transactional`](crate::PgLocks::transactional) (transaction-scoped locks
/// in a transaction this backend opens and commits at release).
///
/// Waiting happens in the server's own lock queue (FIFO), so a release hands the lock to
/// the next waiter with no polling; within one process only the first waiter for a key
/// waits on the server, the others wait their turn locally. While held, the connection is
/// probed every `probe_every`: a failed probe turns the guard `Uncertain`, a closed
/// connection or `session_timeout` without an answer turns it `Lost`.
#[derive(Clone, Debug)]
pub struct PgSessionBackend {
    shared: Arc<Shared>,
    scope: Scope,
    held: Arc<Mutex<HashMap<LeaseId, Held>>>,
}

#[derive(Debug)]
struct Held {
    id: i64,
    conn: Arc<Object>,
    probe: lock_core::Deferred,
}

/// A connection that is on the server's side of an unfinished request. If the request's
/// future is dropped (cancellation, timeout), the server is told to cancel the statement
/// and the connection is closed rather than returned to the pool: closing it ends the
/// session, which frees whatever the request may have been granted.
struct InFlight(Option<Object>);

impl InFlight {
    fn conn(&self) -> Result<&Object, LockError> {
        self.0
            .as_ref()
            .ok_or_else(|| LockError::Protocol("connection already handed over".into()))
    }

    fn finish(mut self) -> Option<Object> {
        self.0.take()
    }
}

/// Runs `stmt` and returns its first row (`None` when it returns none) without waiting for
/// the end of the response.
///
/// The grant and release statements change `application_name`, which the server reports
/// (a ParameterStatus message) between the statement's result and the end of its response
/// (ReadyForQuery). tokio-postgres hands such a response over in two parts, and waiting
/// for the second costs the caller's task another wake-up: 2.24 to 2.31 x `SELECT 1` per
/// lock cycle against 2.16 to 2.21 x returning at the row, in session 13's A/B on a
/// 2-core machine (docs/benchmarks.md). The row already holds everything the caller
/// needs: session-level advisory locks, unlocks and sequence draws take effect when they
/// run, not at commit. What the implicit transaction still commits after the row is the
/// holder record (lost, it leaves `inspect` without metadata until the next grant records
/// it), the crash guard's marker (lost, the next grant moves the sequence again) and the
/// name. The connection discards the rest of the response before answering the next
/// statement sent on it (requests are answered in order).
async fn first_row(
    conn: &tokio_postgres::Client,
    stmt: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Option<tokio_postgres::Row>, tokio_postgres::Error> {
    use futures::StreamExt;
    let rows = conn.query_raw(stmt, params.iter().copied()).await?;
    futures::pin_mut!(rows);
    rows.next().await.transpose()
}

/// Commits the connection's transaction, returning once the server reports the commit
/// done (CommandComplete; see [`first_row`] for why not at the end of the response: the
/// commit reverts the transaction's `application_name`).
async fn commit(conn: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    use futures::StreamExt;
    let msgs = conn.simple_query_raw("COMMIT").await?;
    futures::pin_mut!(msgs);
    match msgs.next().await {
        Some(Err(e)) => Err(e),
        _ => Ok(()),
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(obj) = self.0.take() {
            discard(obj);
        }
    }
}

/// Closes a connection instead of returning it to the pool, after asking the server to
/// cancel whatever it is running.
fn discard(obj: Object) {
    let client = Object::take(obj);
    let token = client.cancel_token();
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), token.cancel_query(NoTls)).await;
            drop(client);
        });
    }
}

impl PgSessionBackend {
    pub(crate) fn new(shared: Arc<Shared>, scope: Scope) -> Self {
        Self {
            shared,
            scope,
            held: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseId, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One acquire: `wait` None = try once; Some(deadline) = wait in the server's queue.
    async fn attempt(
        &self,
        req: &AcquireRequest,
        wait: Option<Option<Instant>>,
    ) -> Result<Grant, LockError> {
        let started = Instant::now();
        self.shared.ready().await?;
        let id = advisory_id(&self.shared.cfg.schema, req.key.as_str());
        let deadline = wait.flatten();
        // Waiters of this process take turns; the head waits on the server.
        let _turn = match wait {
            Some(d) => Some(self.shared.turn(&req.key, started, d).await?),
            None => None,
        };
        let timeout_err = || LockError::Timeout {
            key: req.key.to_string(),
            waited: started.elapsed(),
        };
        let obj = match self.shared.conn(deadline).await {
            Err(e) if deadline.is_some_and(|d| Instant::now() >= d) => {
                tracing::debug!(error = %e, "no connection before the deadline");
                return Err(timeout_err());
            }
            other => other?,
        };
        let wait_ms: Option<i64> = match wait {
            None => None,
            Some(None) => Some(0),
            Some(Some(d)) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(timeout_err());
                }
                Some(i64::try_from(left.as_millis()).unwrap_or(i64::MAX).max(1))
            }
        };
        let xact = self.scope == Scope::Transaction;
        let meta = req.meta.encode();
        let lease = req.lease_id.as_str();
        let flight = InFlight(Some(obj));
        let conn = flight.conn()?;
        let idle = self.shared.server_idle_ms();
        // One plain statement tries the lock and issues the token: no PL/pgSQL call, no
        // lock_timeout to set and restore. A transaction-scoped try goes out right behind
        // its `BEGIN`, in the same round trip. A waiting acquire that finds the lock taken
        // goes on to wait in the server's queue below (in the transaction already open).
        let fast = conn
            .prepare_cached(if xact {
                &self.shared.sql.xact_try
            } else {
                &self.shared.sql.session_try
            })
            .await
            .map_err(map_err)?;
        let idle_text = idle.to_string();
        let sent = Instant::now();
        let op = self.shared.cfg.op_timeout;
        let try_params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&id, &lease, &meta, &idle_text];
        let attempt = async {
            if xact {
                let (_, row) = futures::future::try_join(
                    conn.batch_execute("BEGIN"),
                    first_row(conn, &fast, &try_params),
                )
                .await?;
                Ok(row)
            } else {
                first_row(conn, &fast, &try_params).await
            }
        };
        let tried = tokio::time::timeout(op, attempt)
            .await
            .map_err(|_| LockError::OperationTimeout {
                backend: self.name(),
                op: "acquire",
                after: op,
            })?
            .map_err(map_err)?;
        match tried {
            Some(row) => {
                let t: i64 = row.try_get(0).map_err(map_err)?;
                return self.granted(flight, req, id, t, sent);
            }
            None if wait_ms.is_none() => {
                // Nothing is held; end the transaction.
                if xact {
                    conn.batch_execute("ROLLBACK").await.map_err(map_err)?;
                }
                drop(flight.finish());
                return Err(LockError::Contended {
                    key: req.key.to_string(),
                });
            }
            None => {}
        }
        let stmt = conn
            .prepare_cached(&self.shared.sql.session_acquire)
            .await
            .map_err(map_err)?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
            &req.key.as_str(),
            &id,
            &lease,
            &meta,
            &wait_ms,
            &xact,
            &idle,
        ];
        let sent = Instant::now();
        // Only a waiting acquire gets here (a try was answered above); `lock_timeout`
        // and the caller's cancellation bound it.
        let res = first_row(conn, &stmt, &params).await;
        match res {
            Ok(None) => Err(LockError::Protocol(
                "session_acquire returned no row".into(),
            )),
            Ok(Some(row)) => {
                let token: Option<i64> = row.try_get(0).map_err(map_err)?;
                match token {
                    Some(t) => self.granted(flight, req, id, t, sent),
                    None => {
                        // The function returns NULL only for a try, which this path does
                        // not send; if it ever does, nothing is held: end the transaction.
                        if xact {
                            conn.batch_execute("ROLLBACK").await.map_err(map_err)?;
                        }
                        drop(flight.finish());
                        Err(LockError::Contended {
                            key: req.key.to_string(),
                        })
                    }
                }
            }
            Err(e) if is_lock_timeout(&e) => {
                // lock_timeout ran out. It can race with the grant: a session lock granted
                // just as the timeout fired survives the aborted statement. Give back
                // whatever this connection holds before reporting the timeout.
                let cleanup = if xact {
                    conn.batch_execute("ROLLBACK").await
                } else {
                    conn.query_one(self.shared.sql.session_unlock, &[&id])
                        .await
                        .map(|_| ())
                };
                match cleanup {
                    Ok(()) => drop(flight.finish()),
                    Err(e) => {
                        tracing::debug!(error = %e, "cleanup after lock_timeout failed; closing the connection");
                        drop(flight);
                    }
                }
                Err(timeout_err())
            }
            // Unknown state: the connection is closed (frees anything it held).
            Err(e) => Err(map_err(e)),
        }
    }

    /// The server granted `req` with token `t` on `flight`'s connection: hold it.
    fn granted(
        &self,
        flight: InFlight,
        req: &AcquireRequest,
        id: i64,
        t: i64,
        sent: Instant,
    ) -> Result<Grant, LockError> {
        let token = u64::try_from(t)
            .map_err(|_| LockError::Protocol(format!("negative fencing token {t}")))?;
        let obj = flight
            .finish()
            .ok_or_else(|| LockError::Protocol("connection already handed over".into()))?;
        Ok(self.hold(
            req.lease_id.clone(),
            id,
            obj,
            FencingToken::new(token),
            sent,
        ))
    }

    fn hold(
        &self,
        lease_id: LeaseId,
        id: i64,
        obj: Object,
        token: FencingToken,
        sent: Instant,
    ) -> Grant {
        let conn = Arc::new(obj);
        let (tx, rx) = watch::channel(SessionHealth::Alive);
        // The first probe is due one period after the grant; a lock released before then
        // never starts the probe task (no spawn, no wake-up of another worker).
        let every = self.shared.cfg.probe_every;
        let first = Instant::now() + every;
        let probe = lock_core::spawn_at(
            first,
            probe(
                conn.clone(),
                tx,
                every,
                self.shared.cfg.session_timeout,
                Arc::downgrade(&self.held),
                lease_id.clone(),
                sent,
            ),
        );
        self.held().insert(lease_id, Held { id, conn, probe });
        // Only the probe reports on the session, so nothing changes before its first check.
        Grant::session(token, rx)
    }
}

/// Watches a held lock's connection; on loss, takes the lock out of the held set and
/// closes the connection so the server frees the lock (if it still has it).
async fn probe(
    conn: Arc<Object>,
    tx: watch::Sender<SessionHealth>,
    every: Duration,
    session_timeout: Duration,
    held: std::sync::Weak<Mutex<HashMap<LeaseId, Held>>>,
    lease_id: LeaseId,
    granted_sent: Instant,
) {
    // Measured from when the last answered request was SENT: the server's idle timer
    // started after it arrived, so the client's deadline runs out first.
    let mut last_ok = granted_sent;
    // Started when the first check is due; sleeps between checks.
    let mut first = true;
    let reason = loop {
        if !std::mem::take(&mut first) {
            tokio::time::sleep(every).await;
        }
        if conn.is_closed() {
            break "the connection holding the lock closed (backend terminated or server restarted)".to_owned();
        }
        let sent = Instant::now();
        let ok = matches!(
            tokio::time::timeout(every, conn.simple_query("SELECT 1")).await,
            Ok(Ok(_))
        );
        if ok {
            last_ok = sent;
            tx.send_if_modified(|h| {
                std::mem::replace(h, SessionHealth::Alive) != SessionHealth::Alive
            });
        } else if conn.is_closed() {
            break "the connection holding the lock closed (backend terminated or server restarted)".to_owned();
        } else if last_ok.elapsed() >= session_timeout {
            break format!("the server did not answer for {session_timeout:?}");
        } else {
            tx.send_if_modified(|h| {
                std::mem::replace(h, SessionHealth::Suspended) != SessionHealth::Suspended
            });
        }
    };
    tx.send_replace(SessionHealth::Ended(LossReason::SessionEnded(reason)));
    let entry = held.upgrade().and_then(|h| {
        h.lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&lease_id)
    });
    drop(conn);
    if let Some(h) = entry {
        if let Ok(obj) = Arc::try_unwrap(h.conn) {
            discard(obj);
        }
    }
}

fn parse_app_name(app: &str) -> Option<(LeaseId, u64)> {
    let mut it = app.strip_prefix("lk ")?.split(' ');
    let lease = LeaseId::parse(it.next()?).ok()?;
    let token = it.next()?.parse().ok()?;
    Some((lease, token))
}

#[async_trait]
impl LockBackend for PgSessionBackend {
    fn name(&self) -> &'static str {
        match self.scope {
            Scope::Session => "pg-advisory",
            Scope::Transaction => "pg-xact",
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(LeaseKind::Session)
            .fair(true)
            .notify_waits(true)
            .holder_meta(self.scope == Scope::Session)
    }

    async fn try_acquire(&self, req: &AcquireRequest) -> Result<Grant, LockError> {
        self.attempt(req, None).await
    }

    async fn acquire(
        &self,
        req: &AcquireRequest,
        deadline: Option<Instant>,
    ) -> Result<Grant, LockError> {
        self.attempt(req, Some(deadline)).await
    }

    async fn renew(&self, lease: &LeaseRef, _ttl: Duration) -> Result<Instant, LockError> {
        if !self.held().contains_key(&lease.lease_id) {
            return Err(LockError::NotHeld {
                key: lease.key.to_string(),
            });
        }
        Err(LockError::no_lease_to_extend(self.name()))
    }

    async fn release(&self, lease: &LeaseRef) -> Result<ReleaseOutcome, LockError> {
        let Some(h) = self.held().remove(&lease.lease_id) else {
            return Ok(ReleaseOutcome::NotHeld);
        };
        h.probe.stop().await;
        let Ok(obj) = Arc::try_unwrap(h.conn) else {
            return Err(LockError::Protocol("held connection still shared".into()));
        };
        let op = self.shared.cfg.op_timeout;
        let done = match self.scope {
            // A prepared (cached) statement: one round trip, where a statement given as
            // text costs two (parse, then execute).
            Scope::Session => tokio::time::timeout(op, async {
                let stmt = obj.prepare_cached(&self.shared.sql.session_release).await?;
                let app = self.shared.pg.get_application_name().unwrap_or_default();
                first_row(&obj, &stmt, &[&h.id, &app]).await
            })
            .await
            .map(|r| {
                r.map(|row| {
                    row.and_then(|row| row.try_get::<_, bool>(0).ok())
                        .unwrap_or(false)
                })
            }),
            Scope::Transaction => tokio::time::timeout(op, commit(&obj))
                .await
                .map(|r| r.map(|()| true)),
        };
        match done {
            Ok(Ok(true)) => Ok(ReleaseOutcome::Released),
            Ok(Ok(false)) => Ok(ReleaseOutcome::NotHeld),
            Ok(Err(e)) => {
                // The connection is closed below, which frees the lock on the server.
                discard(obj);
                Err(map_err(e))
            }
            Err(_) => {
                discard(obj);
                Err(LockError::OperationTimeout {
                    backend: self.name(),
                    op: "release",
                    after: op,
                })
            }
        }
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>, LockError> {
        self.shared.ready().await?;
        let id = advisory_id(&self.shared.cfg.schema, key.as_str());
        let (hi, lo) = advisory_lock_parts(id);
        let conn = self.shared.conn(None).await?;
        let rows = conn
            .query(&self.shared.sql.session_inspect, &[&key.as_str(), &hi, &lo])
            .await
            .map_err(map_err)?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let waiters: i64 = row.try_get(4).map_err(map_err)?;
        let waiters = usize::try_from(waiters).ok();
        let app: Option<String> = row.try_get(3).map_err(map_err)?;
        if let Some((lease, token)) = app.as_deref().and_then(parse_app_name) {
            // A holder of this version (or a transaction-scoped holder of an earlier one,
            // whose metadata was not recorded: none is reported).
            let meta: Option<String> = row.try_get(5).map_err(map_err)?;
            let meta = meta
                .as_deref()
                .map_or_else(HolderMeta::default, HolderMeta::decode);
            return Ok(Some(
                LockInfo::new(lease, FencingToken::new(token), meta).waiters(waiters),
            ));
        }
        // A session holder of an earlier version: its `cursor` row.
        let lease: Option<String> = row.try_get(0).map_err(map_err)?;
        let token: Option<i64> = row.try_get(1).map_err(map_err)?;
        let meta: Option<String> = row.try_get(2).map_err(map_err)?;
        match (lease, token) {
            (Some(l), Some(t)) => Ok(Some(
                LockInfo::new(
                    LeaseId::parse(&l)?,
                    FencingToken::new(u64::try_from(t).unwrap_or(0)),
                    HolderMeta::decode(meta.as_deref().unwrap_or("")),
                )
                .waiters(waiters),
            )),
            // The id is held for another key that maps to the same advisory id, or the
            // holder's record is not committed yet.
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_name_parses() {
        let l = LeaseId::random();
        assert_eq!(parse_app_name(&format!("lk {l} 42")), Some((l.clone(), 42)));
        assert_eq!(parse_app_name("lock-pg"), None);
        assert_eq!(parse_app_name(&format!("lk {l} x")), None);
    }
}
