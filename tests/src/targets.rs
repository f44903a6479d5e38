//! Conformance targets for each backend, built from server addresses.

use std::net::SocketAddr;
use std::sync::Arc;

use lock_conformance::proxy::Proxy;
use lock_conformance::{Cut, Target};
use lock_core::{LockBackend, LockError};
use lock_dynamo::{DynamoBackend, DynamoConfig};
use lock_mongo::{MongoBackend, MongoConfig};
use lock_pg::{PgConfig, PgLocks};
use lock_redis::{RedisBackend, RedisConfig, RedlockBackend};
use lock_zk::{ZkBackend, ZkConfig};
use std::time::Duration;

/// Parses the `host:port` of a `scheme://[user@]host:port[/...]` URL.
pub fn addr_of(url: &str) -> Result<SocketAddr, String> {
    let rest = url.split("://").nth(1).ok_or(format!("not a URL: {url}"))?;
    let hostport = rest.rsplit('@').next().unwrap_or(rest);
    let hostport = hostport.split('/').next().unwrap_or(hostport);
    let hostport = hostport.replace("localhost", "127.0.0.1");
    hostport.parse().map_err(|e| format!("{url}: {e}"))
}

/// `url` with its host and port replaced by `addr`.
pub fn with_addr(url: &str, addr: SocketAddr) -> Result<String, String> {
    let old = addr_of(url)?;
    let (scheme, rest) = url.split_once("://").ok_or("not a URL")?;
    let rest = rest.replace("localhost", "127.0.0.1");
    Ok(format!(
        "{scheme}://{}",
        rest.replacen(&old.to_string(), &addr.to_string(), 1)
    ))
}

/// Cuts several proxies at once.
#[derive(Debug)]
struct MultiCut(Vec<Proxy>);

impl Cut for MultiCut {
    fn set_cut(&self, cut: bool) {
        for p in &self.0 {
            p.set_cut(cut);
        }
    }

    fn lose_replies(&self, lost: bool) {
        for p in &self.0 {
            p.lose_replies(lost);
        }
    }
}

fn proxy_err(e: std::io::Error) -> LockError {
    LockError::backend("proxy", false, e)
}

/// The in-memory backend.
pub fn memory() -> Target {
    lock_conformance::memory_target()
}

/// A single Redis server.
pub fn redis(name: &str, url: String, fair: bool) -> Result<Target, String> {
    let addr = addr_of(&url)?;
    let u1 = url.clone();
    Ok(Target::new(
        name,
        Arc::new(move || {
            let cfg = RedisConfig::new(u1.clone()).fair(fair);
            Box::pin(async move {
                let b: Arc<dyn LockBackend> = Arc::new(RedisBackend::connect_with(cfg).await?);
                Ok(b)
            })
        }),
    )
    .cuttable(Arc::new(move || {
        let url = url.clone();
        Box::pin(async move {
            let proxy = Proxy::start(addr).await.map_err(proxy_err)?;
            let via = with_addr(&url, proxy.addr()).map_err(LockError::InvalidConfig)?;
            let cfg = RedisConfig::new(via)
                .fair(fair)
                .op_timeout(std::time::Duration::from_millis(500));
            let b: Arc<dyn LockBackend> = Arc::new(RedisBackend::connect_with(cfg).await?);
            let c: Arc<dyn Cut> = Arc::new(MultiCut(vec![proxy]));
            Ok((b, c))
        })
    })))
}

/// The longest lease of the Redlock target: the suite's default lease. Fresh nodes sit this
/// out once before they take part.
pub const REDLOCK_MAX_LEASE: Duration = Duration::from_secs(10);

/// A Redlock backend over `cfgs`, waited until a majority of its nodes takes part.
async fn redlock_ready(cfgs: Vec<RedisConfig>) -> Result<RedlockBackend, LockError> {
    let b = RedlockBackend::connect_with(
        lock_redis::RedlockConfig::with_nodes(cfgs).max_lease(REDLOCK_MAX_LEASE),
    )
    .await?;
    tokio::time::sleep(b.warm_up().await?).await;
    Ok(b)
}

/// Redlock over independent Redis servers.
pub fn redlock(urls: Vec<String>) -> Result<Target, String> {
    let addrs = urls
        .iter()
        .map(|u| addr_of(u))
        .collect::<Result<Vec<_>, _>>()?;
    let u1 = urls.clone();
    Ok(Target::new(
        "redlock",
        Arc::new(move || {
            let urls = u1.clone();
            Box::pin(async move {
                let cfgs = urls.iter().map(|u| RedisConfig::new(u.as_str())).collect();
                let b: Arc<dyn LockBackend> = Arc::new(redlock_ready(cfgs).await?);
                Ok(b)
            })
        }),
    )
    .cuttable(Arc::new(move || {
        let (urls, addrs) = (urls.clone(), addrs.clone());
        Box::pin(async move {
            let mut proxies = Vec::new();
            let mut cfgs = Vec::new();
            for (u, a) in urls.iter().zip(addrs) {
                let p = Proxy::start(a).await.map_err(proxy_err)?;
                let via = with_addr(u, p.addr()).map_err(LockError::InvalidConfig)?;
                cfgs.push(RedisConfig::new(via).op_timeout(std::time::Duration::from_millis(500)));
                proxies.push(p);
            }
            let b: Arc<dyn LockBackend> = Arc::new(redlock_ready(cfgs).await?);
            let c: Arc<dyn Cut> = Arc::new(MultiCut(proxies));
            Ok((b, c))
        })
    })))
}

/// The PostgreSQL lock modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PgMode {
    /// Session advisory locks.
    Advisory,
    /// Transaction-scoped advisory locks.
    Xact,
    /// Lease rows.
    Lease,
}

impl PgMode {
    /// All modes.
    pub const ALL: [PgMode; 3] = [PgMode::Advisory, PgMode::Xact, PgMode::Lease];

    /// The target name.
    pub fn name(self) -> &'static str {
        match self {
            PgMode::Advisory => "pg-advisory",
            PgMode::Xact => "pg-xact",
            PgMode::Lease => "pg-lease",
        }
    }

    /// The backend of this mode.
    pub fn backend(self, locks: &PgLocks) -> Arc<dyn LockBackend> {
        match self {
            PgMode::Advisory => Arc::new(locks.advisory()),
            PgMode::Xact => Arc::new(locks.transactional()),
            PgMode::Lease => Arc::new(locks.lease_rows()),
        }
    }
}

/// Test settings for PostgreSQL: a small pool, a quick probe.
pub fn pg_config(url: &str) -> PgConfig {
    PgConfig::new(url)
        .pool_size(8)
        .op_timeout(Duration::from_secs(2))
        .session(Duration::from_millis(400), Duration::from_secs(2))
}

/// One PostgreSQL mode.
pub fn pg(mode: PgMode, url: String) -> Result<Target, String> {
    let addr = addr_of(&url)?;
    let u1 = url.clone();
    let mut t = Target::new(
        mode.name(),
        Arc::new(move || {
            let cfg = pg_config(&u1);
            Box::pin(async move { Ok(mode.backend(&PgLocks::connect_with(cfg).await?)) })
        }),
    )
    .cuttable(Arc::new(move || {
        let url = url.clone();
        Box::pin(async move {
            let proxy = Proxy::start(addr).await.map_err(proxy_err)?;
            let via = with_addr(&url, proxy.addr()).map_err(LockError::InvalidConfig)?;
            let cfg = pg_config(&via).op_timeout(Duration::from_millis(800));
            let b = mode.backend(&PgLocks::connect_with(cfg).await?);
            let c: Arc<dyn Cut> = Arc::new(MultiCut(vec![proxy]));
            Ok((b, c))
        })
    }));
    if mode != PgMode::Lease {
        t = t.session_timeout(Duration::from_secs(3));
    }
    Ok(t)
}

/// The ZooKeeper session timeout the tests ask for.
pub const ZK_SESSION: Duration = Duration::from_secs(4);

/// Test settings for ZooKeeper.
pub fn zk_config(connect: &str) -> ZkConfig {
    ZkConfig::new(connect)
        .session_timeout(ZK_SESSION)
        .op_timeout(Duration::from_secs(2))
}

/// ZooKeeper (standalone or an ensemble); `connect` is `host:port,...`.
pub fn zk(name: &str, connect: String) -> Result<Target, String> {
    let addrs = connect
        .split(',')
        .map(|a| addr_of(&format!("tcp://{a}")))
        .collect::<Result<Vec<_>, _>>()?;
    let c1 = connect.clone();
    Ok(Target::new(
        name,
        Arc::new(move || {
            let cfg = zk_config(&c1);
            Box::pin(async move {
                let b: Arc<dyn LockBackend> = Arc::new(ZkBackend::connect_with(cfg).await?);
                Ok(b)
            })
        }),
    )
    .session_timeout(ZK_SESSION)
    .cuttable(Arc::new(move || {
        let addrs = addrs.clone();
        Box::pin(async move {
            let mut proxies = Vec::new();
            for a in addrs {
                proxies.push(Proxy::start(a).await.map_err(proxy_err)?);
            }
            let via = proxies
                .iter()
                .map(|p| p.addr().to_string())
                .collect::<Vec<_>>()
                .join(",");
            let cfg = zk_config(&via).op_timeout(Duration::from_millis(800));
            let b: Arc<dyn LockBackend> = Arc::new(ZkBackend::connect_with(cfg).await?);
            let c: Arc<dyn Cut> = Arc::new(MultiCut(proxies));
            Ok((b, c))
        })
    })))
}

/// MongoDB (a replica set for change streams, or a single server); every target gets its
/// own collection.
pub fn mongo(url: String) -> Result<Target, String> {
    let addr = addr_of(&url)?;
    let collection = format!("leases_{:08x}", rand::random::<u32>());
    let (u1, c1) = (url.clone(), collection.clone());
    Ok(Target::new(
        "mongo",
        Arc::new(move || {
            let cfg = MongoConfig::new(u1.clone())
                .collection(c1.clone())
                .op_timeout(Duration::from_secs(2));
            Box::pin(async move {
                let b: Arc<dyn LockBackend> = Arc::new(MongoBackend::connect_with(cfg).await?);
                Ok(b)
            })
        }),
    )
    .cuttable(Arc::new(move || {
        let (url, collection) = (url.clone(), collection.clone());
        Box::pin(async move {
            let proxy = Proxy::start(addr).await.map_err(proxy_err)?;
            // directConnection: the driver must not discover the members' real addresses.
            let via = with_addr(&url, proxy.addr()).map_err(LockError::InvalidConfig)?;
            let via = if via.contains('?') {
                format!("{via}&directConnection=true")
            } else {
                format!("{via}/?directConnection=true")
            };
            let cfg = MongoConfig::new(via)
                .collection(collection)
                .op_timeout(Duration::from_millis(800));
            let b: Arc<dyn LockBackend> = Arc::new(MongoBackend::connect_with(cfg).await?);
            let c: Arc<dyn Cut> = Arc::new(MultiCut(vec![proxy]));
            Ok((b, c))
        })
    })))
}

/// Settings for a DynamoDB endpoint (moto, DynamoDB Local or AWS): a table of the run's own,
/// created on first use; static test credentials unless the environment gives some.
pub fn dynamo_config(endpoint: &str, table: &str) -> DynamoConfig {
    let cfg = DynamoConfig::new(table)
        .endpoint(endpoint)
        .create_table(true)
        .region(std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()))
        .op_timeout(Duration::from_secs(2));
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_some() {
        cfg
    } else {
        cfg.credentials("testing", "testing")
    }
}

/// A DynamoDB endpoint.
pub fn dynamo(url: String, name: &str) -> Result<Target, String> {
    let addr = addr_of(&url)?;
    let table = format!("locks-{:08x}", rand::random::<u32>());
    let (u1, t1) = (url.clone(), table.clone());
    Ok(Target::new(
        name,
        Arc::new(move || {
            let cfg = dynamo_config(&u1, &t1);
            Box::pin(async move {
                let b: Arc<dyn LockBackend> = Arc::new(DynamoBackend::connect_with(cfg).await?);
                Ok(b)
            })
        }),
    )
    .cuttable(Arc::new(move || {
        let (url, table) = (url.clone(), table.clone());
        Box::pin(async move {
            let proxy = Proxy::start(addr).await.map_err(proxy_err)?;
            let via = with_addr(&url, proxy.addr()).map_err(LockError::InvalidConfig)?;
            let cfg = dynamo_config(&via, &table).op_timeout(Duration::from_millis(800));
            let b: Arc<dyn LockBackend> = Arc::new(DynamoBackend::connect_with(cfg).await?);
            let c: Arc<dyn Cut> = Arc::new(MultiCut(vec![proxy]));
            Ok((b, c))
        })
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_rewritten_to_the_proxy() {
        let a = addr_of("redis://127.0.0.1:6379/0").unwrap();
        assert_eq!(a.port(), 6379);
        let p: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        assert_eq!(
            with_addr("redis://127.0.0.1:6379/0", p).unwrap(),
            "redis://127.0.0.1:7000/0"
        );
        assert_eq!(
            with_addr("postgres://postgres@localhost:5432/db", p).unwrap(),
            "postgres://postgres@127.0.0.1:7000/db"
        );
    }
}
