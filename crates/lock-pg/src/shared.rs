//! What the three modes share: the pool, the schema, per-key local queues and the
//! notification listener.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime,
};
use futures::StreamExt;
use lock_core::backend::bounded;
use lock_core::keyed::{KeyTurns, KeyWakeups};
use lock_core::{LockError, LockKey};
use tokio::sync::{Notify, OnceCell};
use tokio::time::Instant;
use tokio_postgres::AsyncMessage;

use crate::config::PgConfig;
use crate::handoff::Handoffs;
use crate::sql::{self, map_err, Sql, NAME, SCHEMA_VERSION};

/// The shared state of one [`PgLocks`](crate::PgLocks).
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) cfg: PgConfig,
    pub(crate) pg: tokio_postgres::Config,
    /// TLS for every connection (`sslmode` and its companions).
    pub(crate) tls: Tls,
    pub(crate) pool: Pool,
    pub(crate) sql: Sql,
    migrated: OnceCell<()>,
    /// Per-key FIFO turn within this process: only the head waiter of a key waits on the
    /// server (one connection per key waited on, no herd within the process).
    pub(crate) queues: KeyTurns,
    /// Waiters' offers for a direct hand-off at release (lease mode).
    pub(crate) handoffs: Handoffs,
    /// Release notifications (lease mode), per key.
    notifies: Arc<KeyWakeups>,
    listener: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

/// The TLS connector (its configuration holds keys: not shown).
#[derive(Clone)]
pub(crate) struct Tls(crate::tls::Connector);

impl Tls {
    // Without the `tls` feature the connector is `NoTls`, which is `Copy`.
    #[allow(clippy::clone_on_copy)]
    pub(crate) fn connector(&self) -> crate::tls::Connector {
        self.0.clone()
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

impl Shared {
    pub(crate) fn new(
        cfg: PgConfig,
        (pg, tls): (tokio_postgres::Config, crate::tls::Connector),
    ) -> Result<Self, LockError> {
        let tls = Tls(tls);
        let mgr = Manager::from_config(
            pg.clone(),
            tls.connector(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let sql = Sql::new(&cfg.schema);
        let guard = sql.crash_guard.clone();
        let pool = Pool::builder(mgr)
            // Every connection made after a crash runs the crash guard before its first
            // statement (a no-op unless the marker is gone).
            .post_create(Hook::async_fn(move |client, _| {
                let guard = guard.clone();
                Box::pin(async move {
                    client
                        .batch_execute(&guard)
                        .await
                        .map_err(HookError::Backend)
                })
            }))
            .max_size(cfg.pool_size)
            .runtime(Runtime::Tokio1)
            // Most recently used first: a few hot connections serve the steady load (their
            // server processes stay warm). First-in-first-out cycled through every idle
            // connection after a burst, and each lock cycle paid about 150 µs for it.
            .queue_mode(deadpool_postgres::QueueMode::Lifo)
            .create_timeout(Some(cfg.op_timeout))
            .recycle_timeout(Some(cfg.op_timeout))
            .build()
            .map_err(|e| LockError::InvalidConfig(format!("connection pool: {e}")))?;
        Ok(Self {
            sql,
            cfg,
            pg,
            tls,
            pool,
            migrated: OnceCell::new(),
            queues: KeyTurns::default(),
            handoffs: Handoffs::default(),
            notifies: Arc::new(KeyWakeups::default()),
            listener: tokio::sync::Mutex::new(None),
        })
    }

    /// Runs the crash guard (see the schema) as a statement of its own, committed
    /// synchronously before any draw that follows.
    ///
    /// On a connection of its own, not from the pool: the grants that find the marker
    /// missing may hold every pooled connection (in their callers' transactions).
    pub(crate) async fn crash_guard(&self) -> Result<(), LockError> {
        bounded(NAME, "crash guard", self.cfg.op_timeout, async {
            let (client, conn) = self
                .pg
                .connect(self.tls.connector())
                .await
                .map_err(map_err)?;
            let task = tokio::spawn(conn);
            let res = client
                .batch_execute(&self.sql.crash_guard)
                .await
                .map_err(map_err);
            drop(client);
            let _ = task.await;
            res
        })
        .await
    }

    /// A pooled connection, waiting at most until `until` (or the operation timeout).
    pub(crate) async fn conn(&self, until: Option<Instant>) -> Result<Object, LockError> {
        let wait = match until {
            Some(u) => u.saturating_duration_since(Instant::now()),
            None => self.cfg.op_timeout,
        };
        let timeouts = deadpool_postgres::Timeouts {
            wait: Some(wait.max(Duration::from_millis(1))),
            create: Some(self.cfg.op_timeout),
            recycle: Some(self.cfg.op_timeout),
        };
        self.pool.timeout_get(&timeouts).await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => map_err(e),
            deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => {
                LockError::backend(
                    NAME,
                    true,
                    format!(
                        "all {} pooled connections are in use (held locks and waiters each \
                         hold one; raise PgConfig::pool_size)",
                        self.cfg.pool_size
                    ),
                )
            }
            other => LockError::backend(NAME, true, other.to_string()),
        })
    }

    /// Creates the schema once per client when `auto_migrate` is on; otherwise checks once
    /// that it is there, of this client's version.
    pub(crate) async fn ready(&self) -> Result<(), LockError> {
        self.migrated
            .get_or_try_init(|| async {
                if self.cfg.auto_migrate {
                    self.migrate().await
                } else {
                    let conn = self.conn(None).await?;
                    if check_schema(&self.sql, &self.cfg.schema, &conn).await? {
                        return Ok(());
                    }
                    Err(LockError::InvalidConfig(format!(
                        "the lock schema {} is missing (call PgLocks::migrate or enable \
                         auto_migrate)",
                        self.cfg.schema
                    )))
                }
            })
            .await
            .map(|_| ())
    }

    /// Creates the schema, or checks that it is this client's version; serialized across
    /// clients by a transaction-scoped advisory lock so that concurrent first uses do not
    /// race.
    pub(crate) async fn migrate(&self) -> Result<(), LockError> {
        let mut conn = self.conn(None).await?;
        let op = self.cfg.op_timeout * 4;
        let id = sql::advisory_id(&self.cfg.schema, "\0migrate");
        let work = async {
            let tx = conn
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
                .start()
                .await
                .map_err(map_err)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&id])
                .await
                .map_err(map_err)?;
            check_schema(&self.sql, &self.cfg.schema, tx.client()).await?;
            tx.batch_execute(&self.sql.schema_ddl)
                .await
                .map_err(map_err)?;
            // A client's first use after a crash passes here: the guard runs before its
            // grants (and in a new schema, before any token is drawn).
            tx.batch_execute("SET LOCAL synchronous_commit = on")
                .await
                .map_err(map_err)?;
            tx.query(&self.sql.crash_guard_call, &[])
                .await
                .map_err(map_err)?;
            check_sequence(&self.sql, tx.client()).await?;
            tx.commit().await.map_err(map_err)
        };
        let res = bounded(NAME, "migrate", op, work).await;
        if matches!(res, Err(LockError::OperationTimeout { .. })) {
            // Cut off mid-transaction: the connection is not returned to the pool.
            drop(Object::take(conn));
        }
        res
    }

    /// Wakes this process's waiter on `key` at once, after this process released it: it
    /// need not wait for the server's notification, which reaches other processes.
    pub(crate) fn released_here(&self, key: &LockKey) {
        self.notifies.wake(key.as_str());
    }

    /// The release notification for `key`; starts the listener if it is not running.
    /// Without a listener, waiters still poll (bounded by `poll_max`).
    pub(crate) async fn released(&self, key: &LockKey) -> Arc<Notify> {
        let n = self.notifies.get(key.as_str());
        let mut l = self.listener.lock().await;
        if l.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
            match tokio::time::timeout(self.cfg.op_timeout, self.listen()).await {
                Ok(Ok(c)) => *l = Some(c),
                Ok(Err(e)) => tracing::debug!(error = %e, "release listener unavailable; polling"),
                Err(_) => tracing::debug!("release listener timed out; polling"),
            }
        }
        n
    }

    async fn listen(&self) -> Result<tokio_postgres::Client, LockError> {
        let (client, mut conn) = self
            .pg
            .connect(self.tls.connector())
            .await
            .map_err(map_err)?;
        let mut stream = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        // The task only holds a weak reference: it ends with the client or the connection.
        let registry = Arc::downgrade(&self.notifies);
        tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                if let AsyncMessage::Notification(n) = m {
                    match registry.upgrade() {
                        Some(reg) => reg.wake(n.payload()),
                        None => break,
                    }
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {}", self.sql.channel))
            .await
            .map_err(map_err)?;
        Ok(client)
    }
}

/// Whether `schema` holds this client's lock schema (`false`: not yet, and nothing else
/// either). Refuses a lock schema of another version, and a schema that holds objects of
/// its own (the application's tables, a migration tool's `schema_version`): the lock's
/// tables and functions must not be created among them.
async fn check_schema(
    sql: &Sql,
    schema: &str,
    conn: &tokio_postgres::Client,
) -> Result<bool, LockError> {
    let row = conn
        .query_one(&sql.schema_shape, &[])
        .await
        .map_err(map_err)?;
    let columns: Option<String> = row.try_get(0).map_err(map_err)?;
    let occupied: bool = row.try_get(1).map_err(map_err)?;
    match columns.as_deref() {
        Some("one boolean, version integer") => {}
        None if !occupied => return Ok(false),
        _ => {
            return Err(LockError::InvalidConfig(format!(
                "schema {schema} holds tables or functions that are not a lock schema's (no \
                 schema_version record of this library): give the lock a schema of its own \
                 (PgConfig::schema)"
            )))
        }
    }
    let rows = conn
        .query(&sql.schema_version, &[])
        .await
        .map_err(map_err)?;
    let version = match rows.as_slice() {
        [row] => row.try_get::<_, i32>(0).map_err(map_err)?,
        _ => {
            return Err(LockError::InvalidConfig(format!(
                "{schema}.schema_version holds {} rows, not one",
                rows.len()
            )))
        }
    };
    if version != SCHEMA_VERSION {
        return Err(LockError::InvalidConfig(format!(
            "the lock schema {schema} is version {version}; this lock-pg uses version \
             {SCHEMA_VERSION}"
        )));
    }
    Ok(true)
}

/// Refuses a token sequence whose values are not handed out in order: one that caches
/// values per session (each session draws from its own block) or steps by more than one.
async fn check_sequence(sql: &Sql, conn: &tokio_postgres::Client) -> Result<(), LockError> {
    let row = conn
        .query_one(&sql.sequence_check, &[])
        .await
        .map_err(map_err)?;
    let (increment, cache): (i64, i64) = (row.get(0), row.get(1));
    if increment != 1 || cache != 1 {
        return Err(LockError::InvalidConfig(format!(
            "the token sequence steps by {increment} with a cache of {cache}: with a cache, \
             sessions draw from blocks of their own and tokens come out of order; set \
             INCREMENT BY 1 CACHE 1"
        )));
    }
    Ok(())
}
