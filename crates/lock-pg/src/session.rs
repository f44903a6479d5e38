//! Session and transaction-scoped advisory locks, each on a connection held for the life
//! of the lock (see [`PgSessionBackend`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Object;
use lock_core::backend::bounded;
use lock_core::{
    AcquireRequest, Capabilities, FencingToken, Grant, HolderMeta, Keepalive, LeaseId, LeaseKind,
    LeaseRef, LockBackend, LockError, LockInfo, LockKey, ReleaseOutcome,
};
use tokio::time::Instant;

use crate::shared::Shared;
use crate::sql::{self, advisory_id, advisory_lock_parts, is_lock_timeout, map_err, ms, Answer};

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
/// waits on the server, the others wait their turn locally. While held, the server ends
/// the holder's session after `session_timeout` without a message (PostgreSQL 14 and
/// later), and the guard sends one every `probe_every`: the lock is safe until
/// `session_timeout` after the last answered probe was sent (less a drift margin), and
/// turns `Uncertain` when a probe fails, `Lost` at that deadline or when the connection
/// closes.
#[derive(Clone, Debug)]
pub struct PgSessionBackend {
    shared: Arc<Shared>,
    scope: Scope,
    held: Arc<Mutex<HashMap<LeaseId, Held>>>,
}

/// A held lock's connection. Probes and the release take turns on it. Dropped without a
/// completed release (the backend dropped, a release cancelled or timed out), it is closed,
/// not returned to the pool: a pooled connection must never hold a lock.
type HeldConn = Arc<tokio::sync::Mutex<InFlight>>;

#[derive(Debug)]
struct Held {
    id: i64,
    conn: HeldConn,
}

/// A connection that is on the server's side of an unfinished request. If the request's
/// future is dropped (cancellation, timeout), the server is told to cancel the statement
/// and the connection is closed rather than returned to the pool: closing it ends the
/// session, which frees whatever the request may have been granted.
#[derive(Debug)]
struct InFlight(Option<Object>, crate::shared::Tls);

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

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(obj) = self.0.take() {
            discard(obj, self.1.clone());
        }
    }
}

/// Closes a connection instead of returning it to the pool, after asking the server to
/// cancel whatever it is running.
fn discard(obj: Object, tls: crate::shared::Tls) {
    let client = Object::take(obj);
    let token = client.cancel_token();
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            // Over TLS when the connection used it (the token's sslmode asks for it).
            let _ =
                tokio::time::timeout(Duration::from_secs(2), token.cancel_query(tls.connector()))
                    .await;
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

    /// Sends the grant statement (after `BEGIN` in transaction scope, in the same round
    /// trip): `wait_ms` None tries once; Some(0) waits without limit; Some(n) at most n ms.
    async fn grant_statement(
        &self,
        conn: &Object,
        req: &AcquireRequest,
        id: i64,
        wait_ms: Option<i64>,
    ) -> Result<tokio_postgres::Row, tokio_postgres::Error> {
        let xact = self.scope == Scope::Transaction;
        let stmt = conn.prepare_cached(&self.shared.sql.advisory_grant).await?;
        let (lease, meta) = (req.lease_id.as_str(), req.meta.encode());
        let idle = Some(ms(self.shared.cfg.session_timeout));
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
            [&id, &lease, &meta, &wait_ms, &xact, &idle];
        if xact {
            let (_, row) = futures::future::try_join(
                conn.batch_execute("BEGIN"),
                conn.query_one(&stmt, &params),
            )
            .await?;
            Ok(row)
        } else {
            conn.query_one(&stmt, &params).await
        }
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
            Some(d) => Some(self.shared.queues.turn(&req.key, started, d).await?),
            None => None,
        };
        let timeout_err = || LockError::timeout(&req.key, started.elapsed());
        let mut guarded = false;
        loop {
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
                    Some(ms(left).max(1))
                }
            };
            let flight = InFlight(Some(obj), self.shared.tls.clone());
            let conn = flight.conn()?;
            let sent = Instant::now();
            // A try is bounded here; a waiting acquire by lock_timeout and the caller.
            let answer = match wait_ms {
                None => {
                    let op = self.shared.cfg.op_timeout;
                    let statement = async { Ok(self.grant_statement(conn, req, id, None).await) };
                    bounded(self.name(), "acquire", op, statement).await?
                }
                Some(_) => self.grant_statement(conn, req, id, wait_ms).await,
            };
            match answer.map(|row| sql::answer(&row)) {
                Ok(Err(e)) => return Err(e),
                Ok(Ok(Answer::Granted(t))) => {
                    let grant = self.granted(flight, req, id, t, sent);
                    if sent.elapsed() < self.shared.cfg.probe_every {
                        return Ok(grant);
                    }
                    // The guard was not made yet: a failure here leaves the held
                    // connection to the caller's clean-up (a release by lease id).
                    return self.after_wait(req, grant).await;
                }
                Ok(Ok(Answer::Taken)) => {
                    self.finish_empty(flight).await?;
                    return Err(LockError::contended(&req.key));
                }
                Ok(Ok(Answer::GuardFirst)) if !guarded => {
                    self.finish_empty(flight).await?;
                    self.shared.crash_guard().await?;
                    guarded = true;
                }
                Ok(Ok(Answer::GuardFirst)) => {
                    return Err(LockError::Protocol(
                        "the crash marker is still missing after the crash guard ran".into(),
                    ))
                }
                Err(e) if is_lock_timeout(&e) => {
                    // lock_timeout ran out. It can race with the grant: a session lock
                    // granted just as the timeout fired survives the aborted statement.
                    // Give back whatever this connection holds before reporting it.
                    let cleanup = if self.scope == Scope::Transaction {
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
                    return Err(timeout_err());
                }
                // Unknown state: the connection is closed (frees anything it held).
                Err(e) => return Err(map_err(e)),
            }
        }
    }

    /// Returns a connection that holds nothing to the pool (ending its transaction).
    async fn finish_empty(&self, flight: InFlight) -> Result<(), LockError> {
        if self.scope == Scope::Transaction {
            flight
                .conn()?
                .batch_execute("ROLLBACK")
                .await
                .map_err(map_err)?;
        }
        drop(flight.finish());
        Ok(())
    }

    /// The server granted `req` with token `t` on `flight`'s connection: hold it.
    fn granted(
        &self,
        flight: InFlight,
        req: &AcquireRequest,
        id: i64,
        token: FencingToken,
        sent: Instant,
    ) -> Grant {
        let conn = Arc::new(tokio::sync::Mutex::new(flight));
        self.held().insert(req.lease_id.clone(), Held { id, conn });
        let cfg = &self.shared.cfg;
        Grant::kept_alive(
            token,
            sent + cfg.session_timeout,
            Keepalive::new(cfg.session_timeout, cfg.probe_every),
        )
    }

    /// The deadline of a grant that waited in the server's queue: the server's idle timer
    /// started when the grant was answered, somewhere in the wait, so one probe tells from
    /// when it runs (a grant whose deadline counted from before the wait would arrive late
    /// and be given back).
    async fn after_wait(&self, req: &AcquireRequest, grant: Grant) -> Result<Grant, LockError> {
        let (lease, cfg) = (req.lease(), &self.shared.cfg);
        let probe = self.renew(&lease, cfg.session_timeout);
        let deadline = bounded(self.name(), "acquire", cfg.op_timeout, probe).await?;
        let mut grant = grant;
        grant.lease_deadline = Some(deadline);
        Ok(grant)
    }

    /// The held connection of `lease`, if this backend holds it.
    fn held_conn(&self, lease: &LeaseRef) -> Option<HeldConn> {
        self.held().get(&lease.lease_id).map(|h| h.conn.clone())
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
        lock_core::options::check_lease("lease", req.ttl)?;
        self.attempt(req, None).await
    }

    async fn acquire(
        &self,
        req: &AcquireRequest,
        deadline: Option<Instant>,
    ) -> Result<Grant, LockError> {
        lock_core::options::check_lease("lease", req.ttl)?;
        self.attempt(req, Some(deadline)).await
    }

    /// Confirms the session that holds `lease` (any statement restarts the server's idle
    /// timer): the lock is then safe until `session_timeout` after the probe was sent.
    async fn renew(&self, lease: &LeaseRef, _limit: Duration) -> Result<Instant, LockError> {
        let not_held = || LockError::NotHeld {
            key: lease.key.to_string(),
        };
        let conn = self.held_conn(lease).ok_or_else(not_held)?;
        let conn = conn.lock().await;
        let obj = conn.conn().map_err(|_| not_held())?;
        if obj.is_closed() {
            // The session ended (terminated, the server restarted): its locks went with it.
            return Err(not_held());
        }
        let sent = Instant::now();
        match obj.simple_query(self.shared.sql.probe).await {
            Ok(_) => Ok(sent + self.shared.cfg.session_timeout),
            Err(_) if obj.is_closed() => Err(not_held()),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn release(&self, lease: &LeaseRef) -> Result<ReleaseOutcome, LockError> {
        let Some(h) = self.held().remove(&lease.lease_id) else {
            return Ok(ReleaseOutcome::NotHeld);
        };
        // Until the release is answered, dropping `flight` (this future cancelled) closes
        // the connection, which frees the lock.
        let flight = InFlight(h.conn.lock().await.0.take(), self.shared.tls.clone());
        let Ok(obj) = flight.conn() else {
            return Ok(ReleaseOutcome::NotHeld);
        };
        let work = async {
            if self.scope == Scope::Transaction {
                return obj.batch_execute("COMMIT").await.map(|()| true);
            }
            let stmt = obj.prepare_cached(&self.shared.sql.session_release).await?;
            let app = self.shared.pg.get_application_name().unwrap_or_default();
            let row = obj.query_one(&stmt, &[&h.id, &app]).await?;
            Ok(row.try_get::<_, bool>(0).unwrap_or(false))
        };
        // On a timeout or an error the connection is closed as `flight` drops.
        let op = self.shared.cfg.op_timeout;
        match bounded(self.name(), "release", op, async { Ok(work.await) }).await? {
            Ok(released) => {
                drop(flight.finish());
                Ok(if released {
                    ReleaseOutcome::Released
                } else {
                    ReleaseOutcome::NotHeld
                })
            }
            Err(_) if obj.is_closed() => Ok(ReleaseOutcome::NotHeld),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>, LockError> {
        self.shared.ready().await?;
        let id = advisory_id(&self.shared.cfg.schema, key.as_str());
        let (hi, lo) = advisory_lock_parts(id);
        let conn = self.shared.conn(None).await?;
        let rows = conn
            .query(&self.shared.sql.session_inspect, &[&hi, &lo])
            .await
            .map_err(map_err)?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let app: Option<String> = row.try_get(0).map_err(map_err)?;
        let meta: Option<String> = row.try_get(1).map_err(map_err)?;
        let waiters: i64 = row.try_get(2).map_err(map_err)?;
        // No name: the id is held for another key that maps to the same advisory id.
        let Some((lease, token)) = app.as_deref().and_then(parse_app_name) else {
            return Ok(None);
        };
        let meta = meta
            .as_deref()
            .map_or_else(HolderMeta::default, HolderMeta::decode);
        Ok(Some(
            LockInfo::new(lease, FencingToken::new(token), meta)
                .waiters(usize::try_from(waiters).ok()),
        ))
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
