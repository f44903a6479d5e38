#![doc = include_str!("../README.md")]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod config;
mod fence;
mod handoff;
mod lease;
mod session;
mod shared;
mod sql;
mod tls;

use std::sync::Arc;

pub use config::PgConfig;
pub use fence::{fenced_update, FencedTable};
pub use lease::PgLeaseBackend;
pub use session::PgSessionBackend;
pub use sql::{advisory_id, advisory_lock_parts};

/// The core types, so one dependency is enough.
pub use lock_core::{
    self, Backoff, FenceRejected, Fenced, FencedWrite, FencingToken, HolderMeta, LeaseId,
    LockBackend, LockClient, LockError, LockGuard, LockHandle, LockInfo, LockKey, LockOptions,
    LockStatus, LossReason, ReleaseOutcome, WaitPolicy,
};
/// The client libraries this backend is built on.
pub use {deadpool_postgres, tokio_postgres};

use crate::session::Scope;
use crate::shared::Shared;
use crate::sql::{is_lock_timeout, map_err, Answer};

/// A PostgreSQL lock client: a connection pool and the lock schema. Cheap to clone; make
/// one per process and take the backends you need from it.
#[derive(Clone, Debug)]
pub struct PgLocks {
    shared: Arc<Shared>,
}

impl PgLocks {
    /// Connects to `url` with default settings (schema `distlock`, created on first use).
    pub async fn connect(url: &str) -> Result<Self, LockError> {
        Self::connect_with(PgConfig::new(url)).await
    }

    /// Connects with explicit settings. Checks the settings, opens one connection (so a
    /// bad address or password is reported here) and creates the schema if `auto_migrate`.
    pub async fn connect_with(cfg: PgConfig) -> Result<Self, LockError> {
        let parts = cfg.connect_parts()?;
        Self::start(Shared::new(cfg, parts)?).await
    }

    /// Connects with the application's own connection settings (host, user, password,
    /// options); `cfg` gives the lock's settings, its URL is not used. TLS follows `pg`'s
    /// `ssl_mode`: `disable`; `prefer`, encrypted when the server offers it, unverified;
    /// `require`, encrypted, and verified with the host name when
    /// [`PgConfig::tls_ca_pem`] is given.
    ///
    /// The lock keeps a pool of its own, of at most `cfg.pool_size` connections: each new
    /// connection checks, before its first statement, whether the server crashed since the
    /// last token was drawn (see [`PgLocks::migrate`]), which a pool made elsewhere would
    /// not do.
    pub async fn from_config(pg: tokio_postgres::Config, cfg: PgConfig) -> Result<Self, LockError> {
        let parts = cfg.connect_parts_for(pg)?;
        Self::start(Shared::new(cfg, parts)?).await
    }

    async fn start(shared: Shared) -> Result<Self, LockError> {
        let shared = Arc::new(shared);
        drop(shared.conn(None).await?);
        shared.ready().await?;
        Ok(Self { shared })
    }

    /// Creates the lock schema (the tables `lease`, `schema_version` and the unlogged
    /// `holder` and `epoch`; the sequence `token_seq`; the functions `advisory_grant`,
    /// `record_holder` and `crash_guard`), or checks that an existing one is this client's
    /// version. Idempotent and safe to run from many clients at once.
    pub async fn migrate(&self) -> Result<(), LockError> {
        self.shared.migrate().await
    }

    /// Session-level advisory locks (`pg_advisory_lock`): each held lock keeps one
    /// connection for its lifetime; the connection is the lease.
    pub fn advisory(&self) -> PgSessionBackend {
        PgSessionBackend::new(self.shared.clone(), Scope::Session)
    }

    /// Transaction-scoped advisory locks in a transaction the backend opens; release
    /// commits it. To lock inside your own transaction, use
    /// [`PgLocks::lock_in_transaction`].
    pub fn transactional(&self) -> PgSessionBackend {
        PgSessionBackend::new(self.shared.clone(), Scope::Transaction)
    }

    /// Lease-row locks: no connection is held; renewals extend the row.
    pub fn lease_rows(&self) -> PgLeaseBackend {
        PgLeaseBackend::new(self.shared.clone())
    }

    /// The connection pool, for your own statements.
    pub fn pool(&self) -> &deadpool_postgres::Pool {
        &self.shared.pool
    }

    /// Takes the lock on `key` inside the caller's transaction (`pg_advisory_xact_lock`);
    /// it is released when the transaction commits or rolls back. Returns the fencing
    /// token, drawn in the same statement.
    ///
    /// The token is strictly greater than every token of `key` issued before, in every
    /// advisory mode; if the transaction rolls back, the grant is void and its number is
    /// never issued again (it comes from a sequence, which does not roll back). Pass the
    /// token to writes outside the transaction.
    ///
    /// Under READ COMMITTED (the default), every statement after the lock sees what the
    /// previous holder committed. Under REPEATABLE READ or SERIALIZABLE the snapshot is
    /// taken by the transaction's first statement, possibly before the lock was granted:
    /// take the lock in a READ COMMITTED transaction, or expect serialization errors on
    /// rows the previous holder changed (and stale reads of the others).
    ///
    /// Right after a server crash, the first grant runs the crash guard on a connection
    /// of this client's pool first (never in your transaction); a transaction whose
    /// snapshot is older than the guard's commit (REPEATABLE READ or SERIALIZABLE begun
    /// before it) gets a retryable error: roll back and retry.
    ///
    /// `WaitPolicy::NoWait` gives [`LockError::Contended`] if the key is taken;
    /// `Timeout(t)` waits in the server's queue for at most `t` (then
    /// [`LockError::Timeout`], and the transaction is aborted: roll it back).
    ///
    /// ```no_run
    /// # async fn f(locks: lock_pg::PgLocks) -> Result<(), lock_core::LockError> {
    /// use lock_core::WaitPolicy;
    /// use lock_pg::{fenced_update, FencedTable};
    /// let mut conn = locks.pool().get().await.map_err(|e| lock_core::LockError::backend("pg", true, e))?;
    /// let tx = conn.transaction().await.map_err(|e| lock_core::LockError::backend("pg", true, e))?;
    /// let token = locks.lock_in_transaction(&tx, "inventory:item-1", WaitPolicy::Timeout(std::time::Duration::from_secs(5))).await?;
    /// let inventory = FencedTable::new("inventory", "fence_token")?;
    /// let sold = fenced_update(&*tx, &inventory, "stock = stock - 1", "item = $1 AND stock > 0", &[&"item-1"], token).await?;
    /// if sold.is_applied() {
    ///     tx.commit().await.map_err(|e| lock_core::LockError::backend("pg", true, e))?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn lock_in_transaction(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        key: &str,
        wait: WaitPolicy,
    ) -> Result<FencingToken, LockError> {
        let key = LockKey::new(key)?;
        self.shared.ready().await?;
        let id = advisory_id(&self.shared.cfg.schema, key.as_str());
        let wait_ms: Option<i64> = match wait {
            WaitPolicy::NoWait => None,
            WaitPolicy::Forever => Some(0),
            WaitPolicy::Timeout(t) => Some(sql::ms(t).max(1)),
            _ => None,
        };
        let lease = LeaseId::random();
        let meta = HolderMeta::this_process().encode();
        let started = tokio::time::Instant::now();
        let no_idle_limit: Option<i64> = None;
        let mut guarded = false;
        loop {
            let res = tx
                .query_one(
                    &self.shared.sql.advisory_grant,
                    &[&id, &lease.as_str(), &meta, &wait_ms, &true, &no_idle_limit],
                )
                .await;
            let answer = match res {
                Ok(row) => sql::answer(&row)?,
                Err(e) if is_lock_timeout(&e) => {
                    return Err(LockError::timeout(&key, started.elapsed()))
                }
                Err(e) => return Err(map_err(e)),
            };
            match answer {
                Answer::Granted(token) => return Ok(token),
                Answer::Taken => return Err(LockError::contended(&key)),
                Answer::GuardFirst if !guarded => {
                    self.shared.crash_guard().await?;
                    guarded = true;
                }
                Answer::GuardFirst => {
                    return Err(LockError::backend(
                        sql::NAME,
                        true,
                        "the server recovered from a crash after this transaction's snapshot \
                         was taken: roll back and retry",
                    ))
                }
            }
        }
    }
}
