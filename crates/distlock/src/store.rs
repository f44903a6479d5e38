//! The store a `--store` URL names, opened as a lock backend.

use std::sync::Arc;

use lock_core::{LockBackend, LockError};

/// TLS material from files, for the stores that take it.
#[derive(Debug, Default)]
#[cfg_attr(
    not(any(feature = "redis", feature = "postgres", feature = "zookeeper")),
    allow(dead_code)
)]
pub(crate) struct Tls {
    pub(crate) ca: Option<Vec<u8>>,
    pub(crate) client: Option<(Vec<u8>, Vec<u8>)>,
}

/// How to open the store.
#[derive(Debug)]
pub(crate) struct StoreOpts {
    /// The lease `run` asks for (a Redlock refuses one above its `max_lease`).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) lease: Option<std::time::Duration>,
    /// PostgreSQL lock mode: `advisory` (session lock, the default), `lease` or `xact`.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) pg_mode: String,
    #[cfg_attr(
        not(any(feature = "redis", feature = "postgres", feature = "zookeeper")),
        allow(dead_code)
    )]
    pub(crate) tls: Tls,
}

fn bad(m: impl Into<String>) -> LockError {
    LockError::InvalidConfig(m.into())
}

/// The backend for `url`. Errors never show the URL (it may hold a password).
pub(crate) async fn open(url: &str, o: &StoreOpts) -> Result<Arc<dyn LockBackend>, LockError> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(bad(
            "the store must be a URL: redis://, rediss://, redlock://, postgres://, zk://, \
             mongodb:// or dynamodb://",
        ));
    };
    if rest.is_empty() {
        return Err(bad(format!("the {scheme}:// store names no server")));
    }
    let _ = (rest, o);
    match scheme {
        #[cfg(feature = "redis")]
        "redis" | "rediss" => Ok(Arc::new(
            lock_redis::RedisBackend::connect_with(redis_config(url.to_owned(), o)).await?,
        )),
        #[cfg(feature = "redis")]
        "redlock" | "redlock+tls" => {
            let inner = if scheme == "redlock" {
                "redis"
            } else {
                "rediss"
            };
            // The user information, if any, is every node's (a password may hold `?`).
            let (user, nodes) = match rest.rsplit_once('@') {
                Some((user, nodes)) => (format!("{user}@"), nodes),
                None => (String::new(), rest),
            };
            let (nodes, max_lease) = redlock_max_lease(nodes)?;
            if let Some(lease) = o.lease.filter(|l| *l > max_lease) {
                return Err(bad(format!(
                    "the lease {lease:?} (--lease) is longer than the Redlock's max_lease \
                     {max_lease:?} (set ?max_lease= on the store URL, the same for every client \
                     of these nodes)"
                )));
            }
            let nodes = nodes
                .split(',')
                .map(|n| redis_config(format!("{inner}://{user}{n}"), o))
                .collect();
            let b = lock_redis::RedlockBackend::connect_with(
                lock_redis::RedlockConfig::with_nodes(nodes).max_lease(max_lease),
            )
            .await?;
            // Nodes that lost their data sit out the longest lease before they count.
            tokio::time::sleep(b.warm_up().await?).await;
            Ok(Arc::new(b))
        }
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => {
            let mut cfg = lock_pg::PgConfig::new(url);
            if let Some(ca) = &o.tls.ca {
                cfg = cfg.tls_ca_pem(ca.clone());
            }
            if let Some((cert, key)) = &o.tls.client {
                cfg = cfg.tls_client_pem(cert.clone(), key.clone());
            }
            let locks = lock_pg::PgLocks::connect_with(cfg.pool_size(2)).await?;
            match o.pg_mode.as_str() {
                "advisory" => Ok(Arc::new(locks.advisory())),
                "lease" => Ok(Arc::new(locks.lease_rows())),
                "xact" => Ok(Arc::new(locks.transactional())),
                other => Err(bad(format!(
                    "--pg-mode {other:?}: one of advisory, lease, xact"
                ))),
            }
        }
        #[cfg(feature = "zookeeper")]
        "zk" | "zk+tls" => {
            // zk+tls://[user:pass@]h1:2281,h2:2281/chroot: every address over TLS; the
            // user information is digest authentication.
            let (digest, hosts) = match rest.rsplit_once('@') {
                Some((user, hosts)) => (Some(user), hosts),
                None => (None, rest),
            };
            let connect = if scheme == "zk" {
                hosts.to_owned()
            } else {
                hosts
                    .split(',')
                    .map(|h| format!("tcp+tls://{h}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let mut cfg = lock_zk::ZkConfig::new(connect);
            if let Some(d) = digest {
                cfg = cfg.digest_auth(d);
            }
            if let Some(ca) = &o.tls.ca {
                cfg = cfg.tls_ca_pem(ca.clone());
            }
            if let Some((cert, key)) = &o.tls.client {
                cfg = cfg.tls_client_pem(cert.clone(), key.clone());
            }
            Ok(Arc::new(lock_zk::ZkBackend::connect_with(cfg).await?))
        }
        #[cfg(feature = "mongodb")]
        "mongodb" | "mongodb+srv" => Ok(Arc::new(
            lock_mongo::MongoBackend::connect_with(lock_mongo::MongoConfig::new(url)).await?,
        )),
        #[cfg(feature = "dynamodb")]
        "dynamodb" => Ok(Arc::new(
            lock_dynamo::DynamoBackend::connect_with(dynamo_config(rest)?).await?,
        )),
        other => Err(bad(format!(
            "unknown store scheme {other}:// (or not built in: see the cargo features)"
        ))),
    }
}

#[cfg(feature = "redis")]
fn redis_config(url: String, o: &StoreOpts) -> lock_redis::RedisConfig {
    let mut cfg = lock_redis::RedisConfig::new(url);
    if let Some(ca) = &o.tls.ca {
        cfg = cfg.tls_ca_pem(ca.clone());
    }
    if let Some((cert, key)) = &o.tls.client {
        cfg = cfg.tls_client_pem(cert.clone(), key.clone());
    }
    cfg
}

/// The node list of a `redlock://` URL (after its user information) and its
/// `?max_lease=` (the library's default if absent): the longest lease any client of these
/// nodes takes, and how long a node that lost its data sits out.
#[cfg(feature = "redis")]
fn redlock_max_lease(hosts: &str) -> Result<(&str, std::time::Duration), LockError> {
    use lock_core::options::{MAX_LEASE, MIN_LEASE};
    let mut max = lock_redis::RedlockConfig::with_nodes(Vec::new()).max_lease;
    let Some((nodes, query)) = hosts.split_once('?') else {
        return Ok((hosts, max));
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("max_lease", v)) => {
                max = crate::duration("max_lease", v).map_err(|(_, m)| bad(m))?;
            }
            _ => {
                let name = pair.split('=').next().unwrap_or_default();
                return Err(bad(format!("redlock:// option {name:?}: only max_lease")));
            }
        }
    }
    if !(MIN_LEASE..=MAX_LEASE).contains(&max) {
        return Err(bad(format!(
            "redlock:// max_lease {max:?} is out of range ({MIN_LEASE:?} to {MAX_LEASE:?})"
        )));
    }
    Ok((nodes.trim_end_matches('/'), max))
}

/// `dynamodb://TABLE[?region=R&endpoint=URL&create=true]`; credentials from the
/// environment.
#[cfg(feature = "dynamodb")]
fn dynamo_config(rest: &str) -> Result<lock_dynamo::DynamoConfig, LockError> {
    let (table, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut cfg = lock_dynamo::DynamoConfig::new(table.trim_end_matches('/'));
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        cfg = match k {
            "region" => cfg.region(v),
            "endpoint" => cfg.endpoint(v),
            "create" => cfg.create_table(v == "true"),
            other => {
                return Err(bad(format!(
                    "dynamodb:// option {other:?}: one of region, endpoint, create"
                )))
            }
        };
    }
    Ok(cfg)
}
