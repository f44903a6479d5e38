//! The backends the chaos workers run, built the same way in the workers and in the
//! harness (which inspects the key during a fault).

use std::sync::Arc;
use std::time::Duration;

use lock_core::LockBackend;

/// The longest lease a chaos worker takes on Redlock (the scenarios' leases are 0.8 s and,
/// for a failover, 3 s).
pub(crate) const REDLOCK_MAX_LEASE: Duration = Duration::from_secs(3);

/// The backend `kind` on `url`, configured as the chaos workers use it.
pub(crate) async fn backend(
    kind: &str,
    url: &str,
    replica_acks: usize,
) -> Result<Arc<dyn LockBackend>, String> {
    let e = |e: lock_core::LockError| e.to_string();
    Ok(match kind {
        "redis" | "redis-unfair" => {
            let mut cfg = lock_redis::RedisConfig::new(url).fair(kind == "redis");
            if replica_acks > 0 {
                cfg = cfg.replica_acks(replica_acks, Duration::from_millis(300));
            }
            Arc::new(
                lock_redis::RedisBackend::connect_with(cfg)
                    .await
                    .map_err(e)?,
            )
        }
        "redlock" => {
            let urls: Vec<&str> = url.split(',').collect();
            let b = lock_redis::RedlockBackend::connect_with(
                lock_redis::RedlockConfig::new(&urls).max_lease(REDLOCK_MAX_LEASE),
            )
            .await
            .map_err(e)?;
            // Nodes new to the lock (or restarted empty) sit out the longest lease first.
            tokio::time::sleep(b.warm_up().await.map_err(e)?).await;
            Arc::new(b)
        }
        "zk" | "zk-ensemble3" => Arc::new(
            lock_zk::ZkBackend::connect_with(
                lock_zk::ZkConfig::new(url).session_timeout(Duration::from_secs(2)),
            )
            .await
            .map_err(e)?,
        ),
        "pg-lease" | "pg-advisory" | "pg-xact" => {
            let locks = lock_pg::PgLocks::connect_with(
                lock_pg::PgConfig::new(url)
                    .pool_size(4)
                    .session(Duration::from_millis(400), Duration::from_secs(2)),
            )
            .await
            .map_err(e)?;
            match kind {
                "pg-lease" => Arc::new(locks.lease_rows()),
                "pg-xact" => Arc::new(locks.transactional()),
                _ => Arc::new(locks.advisory()),
            }
        }
        "dynamo" => Arc::new(
            lock_dynamo::DynamoBackend::connect_with(
                lock_tests::targets::dynamo_config(url, "chaos-locks")
                    .op_timeout(Duration::from_millis(500)),
            )
            .await
            .map_err(e)?,
        ),
        other => return Err(format!("unknown backend {other}")),
    })
}
