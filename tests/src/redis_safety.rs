//! Redis deployments and faults that break a lock unless the backend guards against them:
//! Redlock nodes down at connect or restarted empty, eviction, cluster mode, token
//! records that never expire, token precision, fences kept apart from their data,
//! failover to a replica whose clock is behind. Each check starts its own servers.

use std::time::Duration;

use lock_core::{LockClient, LockError, LockOptions, WaitPolicy};
use lock_redis::redis;
use lock_redis::{FencedWrite, RedisBackend, RedisConfig, RedlockBackend, RedlockConfig};
use tokio::time::{sleep, Instant};

use crate::servers::Redis;

type Res<T> = Result<T, String>;

fn e2s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

async fn start(n: usize) -> Res<Vec<Redis>> {
    tokio::task::spawn_blocking(move || {
        (0..n)
            .map(|_| Redis::start(false))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(e2s)?
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Res<T> + Send + 'static) -> Res<T> {
    tokio::task::spawn_blocking(f).await.map_err(e2s)?
}

async fn cmd<T: redis::FromRedisValue>(url: &str, args: &[&str]) -> Res<T> {
    let client = redis::Client::open(url).map_err(e2s)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(e2s)?;
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query_async(&mut conn).await.map_err(e2s)
}

/// The longest lease of the Redlock checks: a node that lost its data (or is new to the
/// lock) sits out this long.
pub(crate) const MAX_LEASE: Duration = Duration::from_secs(3);

/// A Redlock over `urls` (op timeout `op`, longest lease [`MAX_LEASE`]), connected and
/// warmed up: the nodes are new to the lock, so a majority takes part only after
/// [`MAX_LEASE`].
pub(crate) async fn redlock(urls: &[String], op: Duration) -> Res<RedlockBackend> {
    let b = RedlockBackend::connect_with(
        RedlockConfig::with_nodes(
            urls.iter()
                .map(|u| RedisConfig::new(u.as_str()).op_timeout(op))
                .collect(),
        )
        .max_lease(MAX_LEASE),
    )
    .await
    .map_err(e2s)?;
    let wait = b.warm_up().await.map_err(e2s)?;
    sleep(wait).await;
    Ok(b)
}

fn redlock_opts(lease: Duration) -> LockOptions {
    LockOptions::default()
        .lease(lease)
        .wait(WaitPolicy::NoWait)
        .op_timeout(Duration::from_secs(2))
}

/// Five nodes configured, two down when the client connects, then a third stopped: two of
/// five answer, which is no majority, so acquire is refused. The two that were down come
/// back: acquire grants again, and they hold the grant too.
pub(crate) async fn redlock_majority_counts_configured_nodes() -> Res<String> {
    let mut nodes = start(5).await?;
    let urls: Vec<String> = nodes.iter().map(Redis::url).collect();
    nodes[3].proc.stop();
    nodes[4].proc.stop();
    let backend = redlock(&urls, Duration::from_secs(2)).await?;
    let c = LockClient::new(backend).with_options(redlock_opts(MAX_LEASE));
    nodes[2].proc.stop();
    match c.acquire("majority").await {
        Ok(g) => {
            let _ = g.release().await;
            return Err("granted with 2 of 5 configured nodes answering".into());
        }
        Err(e) => {
            if !e.is_retryable() {
                return Err(format!(
                    "2 of 5 nodes: expected a retryable refusal, got {e}"
                ));
            }
        }
    }
    let mut back = Vec::new();
    for i in [3, 4] {
        let mut n = std::mem::replace(&mut nodes[i], Redis::start(false)?);
        n = blocking(move || n.restart().map(|_| n)).await?;
        back.push(n);
    }
    // The returning nodes are new to the lock: they may sit out a while first.
    let t = Instant::now();
    let g = loop {
        match c.acquire("majority").await {
            Ok(g) => break g,
            Err(e) if t.elapsed() < Duration::from_secs(30) => {
                let _ = e;
                sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(format!("with 4 of 5 nodes back: {e}")),
        }
    };
    for n in &back {
        let held: Vec<String> = cmd(&n.url(), &["KEYS", "*"]).await?;
        let holds = held
            .iter()
            .any(|k| k.contains("majority") && !k.contains("fence"));
        if !holds {
            return Err(format!(
                "a node that came back does not hold the grant (keys {held:?})"
            ));
        }
    }
    g.release().await.map_err(e2s)?;
    Ok(format!(
        "refused with 2 of 5; granted on the returning nodes {:.1} s after they came back",
        t.elapsed().as_secs_f64()
    ))
}

/// A holds a key on nodes {1, 2} of three (node 3 was down); node 3 comes back empty and
/// node 2 restarts empty while A's lease runs. Nodes 2 and 3 would make a majority for B:
/// they must sit out until A's lease could have ended.
pub(crate) async fn redlock_restarted_node_sits_out() -> Res<String> {
    restarted_nodes_sit_out(MAX_LEASE).await
}

/// The same with clients configured for a shorter longest lease (1 s) than A's: node 1's
/// marker tells them A's, so the restarted nodes sit out that long, not 1 s, even for a
/// new client whose first try reaches them after 1 s.
pub(crate) async fn redlock_shorter_max_lease_learns_the_longest() -> Res<String> {
    restarted_nodes_sit_out(Duration::from_secs(1)).await
}

/// A holds a lease of [`MAX_LEASE`] on nodes 1 and 2 (node 3 down); nodes 2 and 3 restart
/// empty; B (longest lease `b_max`) must not be granted while A's lease runs, and is once
/// the longest lease has passed.
async fn restarted_nodes_sit_out(b_max: Duration) -> Res<String> {
    let mut nodes = start(3).await?;
    let urls: Vec<String> = nodes.iter().map(Redis::url).collect();
    let op = Duration::from_secs(2);
    // Every node has served the lock (a node new to it sits out).
    drop(redlock(&urls, op).await?);
    nodes[2].proc.stop();
    let lease = MAX_LEASE;
    // Without renewals A sends nothing after its grant: only B's requests reach the nodes.
    let a = LockClient::new(redlock(&urls, op).await?)
        .with_options(redlock_opts(lease).auto_renew(false));
    let ga = a.acquire("restart").await.map_err(|e| format!("A: {e}"))?;
    let granted = Instant::now();
    let mut n3 = std::mem::replace(&mut nodes[2], Redis::start(false)?);
    n3 = blocking(move || n3.restart().map(|_| n3)).await?;
    nodes[2] = n3;
    let mut n2 = std::mem::replace(&mut nodes[1], Redis::start(false)?);
    n2 = blocking(move || n2.restart().map(|_| n2)).await?;
    nodes[1] = n2;
    let client = |urls: &[String]| {
        let cfg =
            RedlockConfig::with_nodes(urls.iter().map(|u| RedisConfig::new(u.as_str())).collect())
                .max_lease(b_max);
        async move { RedlockBackend::connect_with(cfg).await.map_err(e2s) }
    };
    if b_max < MAX_LEASE {
        // A try by a client of the restarted nodes only: their markers then name `b_max`,
        // and have sat out that long by the time B, new, makes its first try.
        let probe = LockClient::new(client(&urls[1..]).await?).with_options(redlock_opts(b_max));
        if let Ok(g) = probe.acquire("restart").await {
            return Err(format!(
                "the probe was granted (token {}) during A's lease (token {})",
                g.token(),
                ga.token()
            ));
        }
        sleep(b_max + Duration::from_millis(100)).await;
    }
    let b = LockClient::new(client(&urls).await?).with_options(redlock_opts(b_max));
    let mut tries = 0;
    while granted.elapsed() < lease - Duration::from_millis(500) {
        tries += 1;
        if let Ok(gb) = b.acquire("restart").await {
            let (ta, tb) = (ga.token(), gb.token());
            let _ = gb.release().await;
            return Err(format!(
                "B was granted (token {tb}) {:?} into A's {lease:?} lease (token {ta}) on nodes that restarted empty",
                granted.elapsed()
            ));
        }
        sleep(Duration::from_millis(200)).await;
    }
    let a_status = ga.status();
    drop(ga);
    // Once the longest lease has passed since the restarts, the nodes take part again.
    sleep(MAX_LEASE).await;
    let gb = b
        .acquire("restart")
        .await
        .map_err(|e| format!("B after the sit-out: {e}"))?;
    gb.release().await.map_err(e2s)?;
    Ok(format!(
        "B refused {tries} times during A's {lease:?} lease (A: {a_status:?}), granted after the sit-out"
    ))
}

/// Under any eviction policy Redis may evict a held lock or a token record: connect
/// refuses, naming the setting.
pub(crate) async fn eviction_policies_refused_at_connect() -> Res<String> {
    let server = start(1).await?.remove(0);
    let url = server.url();
    let mut refused = Vec::new();
    for policy in [
        "volatile-lru",
        "volatile-lfu",
        "volatile-random",
        "volatile-ttl",
        "allkeys-lru",
        "allkeys-lfu",
        "allkeys-random",
    ] {
        let _: String = cmd(&url, &["CONFIG", "SET", "maxmemory-policy", policy]).await?;
        match RedisBackend::connect(&url).await {
            Err(LockError::InvalidConfig(m)) if m.contains("maxmemory-policy") => {
                refused.push(policy)
            }
            Err(e) => return Err(format!("{policy}: refused without naming the setting: {e}")),
            Ok(_) => {
                return Err(format!(
                    "connected to a server with maxmemory-policy {policy}"
                ))
            }
        }
    }
    let _: String = cmd(&url, &["CONFIG", "SET", "maxmemory-policy", "noeviction"]).await?;
    RedisBackend::connect(&url)
        .await
        .map_err(|e| format!("noeviction: {e}"))?;
    Ok(format!(
        "refused {}; noeviction accepted",
        refused.join(", ")
    ))
}

/// A cluster-enabled server is refused at connect (the scripts' keys are not declared per
/// hash slot).
pub(crate) async fn cluster_mode_refused_at_connect() -> Res<String> {
    let server = blocking(|| {
        Redis::start_with(
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ],
            &[],
        )
    })
    .await?;
    match RedisBackend::connect(&server.url()).await {
        Err(LockError::InvalidConfig(m)) if m.contains("cluster") => Ok(m),
        Err(e) => Err(format!("refused without saying why: {e}")),
        Ok(_) => Err("connected to a cluster-enabled server".into()),
    }
}

/// After a release nothing the backend wrote for the key stays forever: the token record
/// expires once the server clock alone keeps the next token higher.
pub(crate) async fn token_records_expire() -> Res<String> {
    let server = start(1).await?.remove(0);
    let c = LockClient::new(RedisBackend::connect(&server.url()).await.map_err(e2s)?);
    for i in 0..3 {
        let g = c.acquire(&format!("bounded-{i}")).await.map_err(e2s)?;
        g.release().await.map_err(e2s)?;
    }
    let keys: Vec<String> = cmd(&server.url(), &["KEYS", "*"]).await?;
    let mut forever = Vec::new();
    for k in &keys {
        let ttl: i64 = cmd(&server.url(), &["PTTL", k]).await?;
        if ttl < 0 {
            forever.push(k.clone());
        }
    }
    if !forever.is_empty() {
        return Err(format!("keys without an expiry after release: {forever:?}"));
    }
    Ok(format!("{} keys left, each with an expiry", keys.len()))
}

/// The key holding the token counter of `key` (the string key the backend left).
async fn counter_key(url: &str, key: &str) -> Res<String> {
    let keys: Vec<String> = cmd(url, &["KEYS", "*"]).await?;
    for k in keys {
        let kind: String = cmd(url, &["TYPE", &k]).await?;
        if kind == "string" && k.contains(key) {
            return Ok(k);
        }
    }
    Err(format!("no token record for {key}"))
}

/// Tokens near and above 2^53 (where a Lua number stops being exact) are issued and
/// compared exactly.
pub(crate) async fn tokens_exact_beyond_2_pow_53() -> Res<String> {
    let server = start(1).await?.remove(0);
    let url = server.url();
    let b = RedisBackend::connect(&url).await.map_err(e2s)?;
    let c = LockClient::new(b.clone());
    let g = c.acquire("big").await.map_err(e2s)?;
    g.release().await.map_err(e2s)?;
    let counter = counter_key(&url, "big").await?;
    let mut seen = Vec::new();
    for start in [(1u64 << 53) - 2, (1 << 53) + 1, (1 << 62) + 5] {
        let _: () = cmd(&url, &["SET", &counter, &start.to_string()]).await?;
        let mut last = start;
        for _ in 0..3 {
            let g = c.acquire("big").await.map_err(e2s)?;
            let t = g.token().get();
            g.release().await.map_err(e2s)?;
            if t != last + 1 {
                return Err(format!("after {last} the next token was {t}"));
            }
            last = t;
            seen.push(t);
        }
    }
    // The fence compares exactly too.
    for high in [(1u64 << 53) + 2, (1 << 54) + 4, (1 << 62) + 8] {
        let res = format!("fenced-{high}");
        let w = b
            .fenced_set(&res, lock_core::FencingToken::new(high), "new")
            .await
            .map_err(e2s)?;
        if w != FencedWrite::Applied(1) {
            return Err(format!("the first write at {high} gave {w:?}"));
        }
        let stale = b
            .fenced_set(&res, lock_core::FencingToken::new(high - 1), "stale")
            .await
            .map_err(e2s)?;
        if stale
            != (FencedWrite::Refused {
                highest: lock_core::FencingToken::new(high),
            })
        {
            return Err(format!("token {} after {high}: {stale:?}", high - 1));
        }
    }
    Ok(format!("tokens {seen:?}"))
}

/// A server whose clock is ten years ahead must not issue tokens from it: one such token
/// would push every later token of the key (and, through Redlock, of a majority) that far.
pub(crate) async fn clock_far_ahead_is_refused() -> Res<String> {
    let env = crate::servers::clock_offset_env(10 * 365 * 86_400)?;
    let server = blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Redis::start_with(&[], &env)
    })
    .await?;
    let c = LockClient::new(RedisBackend::connect(&server.url()).await.map_err(e2s)?);
    match c.acquire("future").await {
        Err(e) if e.to_string().contains("clock") => Ok(e.to_string()),
        Err(e) => Err(format!("refused without naming the clock: {e}")),
        Ok(g) => Err(format!(
            "granted token {} from a clock ten years ahead",
            g.token()
        )),
    }
}

/// A fenced write keeps its fence in the resource's own key, so the two cannot vanish
/// apart (eviction, a partial restore), and resource names cannot collide with fences.
pub(crate) async fn fence_lives_with_its_data() -> Res<String> {
    let server = start(1).await?.remove(0);
    let url = server.url();
    let b = RedisBackend::connect(&url).await.map_err(e2s)?;
    let t = lock_core::FencingToken::new;
    let _ = b.fenced_set("x", t(5), "a").await.map_err(e2s)?;
    let keys: Vec<String> = cmd(&url, &["KEYS", "*"]).await?;
    if keys != ["x"] {
        return Err(format!("a fenced write to x wrote the keys {keys:?}"));
    }
    let _ = b.fenced_set("x:fence", t(1), "b").await.map_err(e2s)?;
    match b.fenced_set("x", t(4), "c").await {
        Ok(FencedWrite::Refused { highest }) if highest == t(5) => {}
        other => {
            return Err(format!(
                "x at token 5, then a write to x:fence: a token-4 write to x gave {other:?}"
            ))
        }
    }
    // Whatever else goes, the fence cannot go without the value: deleting every key but
    // the resource leaves its fence in place.
    let _: i64 = cmd(&url, &["DEL", "x:fence"]).await?;
    match b.fenced_set("x", t(4), "d").await {
        Ok(FencedWrite::Refused { .. }) => {}
        other => {
            return Err(format!(
                "a stale write after x:fence was deleted: {other:?}"
            ))
        }
    }
    let v = b.fenced_get("x").await.map_err(e2s)?.ok_or("x is gone")?;
    if v.value != "a" || v.token != t(5) {
        return Err(format!("x holds {v:?}"));
    }
    Ok("one key per resource, holding value and token; x:fence is a resource of its own".into())
}

/// Two holders in turn, the older first: both read 100, then both write. With the fenced
/// read-modify-write neither update is lost: the older holder's write, made after the
/// newer one's, is refused; made before it, the newer one computes on top of it.
pub(crate) async fn fenced_read_modify_write_loses_no_update() -> Res<String> {
    let server = start(1).await?.remove(0);
    let b = RedisBackend::connect(&server.url()).await.map_err(e2s)?;
    let t = lock_core::FencingToken::new;
    let (old, new) = (t(10), t(11));
    let decrement = |v: Option<&str>| {
        let left: u64 = v.and_then(|s| s.parse().ok()).unwrap_or(0);
        (left - 1).to_string()
    };
    let mut outcomes = Vec::new();
    for old_first in [true, false] {
        let res = format!("stock-{old_first}");
        if !b
            .fenced_set(&res, t(1), "100")
            .await
            .map_err(e2s)?
            .is_applied()
        {
            return Err("the first write was refused".into());
        }
        // Both read 100 (the newer holder's function sees it before the older writes).
        let (first, second) = if old_first { (old, new) } else { (new, old) };
        let seen = b.fenced_get(&res).await.map_err(e2s)?.ok_or("no value")?;
        if seen.value != "100" {
            return Err(format!("read {seen:?}"));
        }
        let w1 = b.fenced_update(&res, first, decrement).await.map_err(e2s)?;
        let w2 = b
            .fenced_update(&res, second, decrement)
            .await
            .map_err(e2s)?;
        let end = b.fenced_get(&res).await.map_err(e2s)?.ok_or("no value")?;
        let accepted = [w1, w2]
            .iter()
            .filter(|w| matches!(w, FencedWrite::Applied(_)))
            .count() as u64;
        if end.value != (100 - accepted).to_string() {
            return Err(format!(
                "{accepted} decrements accepted ({w1:?}, {w2:?}) but the value is {}",
                end.value
            ));
        }
        if end.token != new {
            return Err(format!("the value carries token {}", end.token));
        }
        outcomes.push(format!("{w1:?} then {w2:?} -> {}", end.value));
    }
    // A compare-and-set under one token: the value changed between the read and the
    // write (another write with the same token) is read again, not overwritten.
    let res = "stock-cas";
    if !b
        .fenced_set(res, new, "10")
        .await
        .map_err(e2s)?
        .is_applied()
    {
        return Err("the first write was refused".into());
    }
    let mut calls = 0;
    let url = server.url();
    let w = b
        .fenced_update(res, new, |v| {
            calls += 1;
            if calls == 1 {
                // Another write with the same token slips in after the read.
                let wrote = redis::Client::open(url.as_str())
                    .and_then(|c| c.get_connection())
                    .and_then(|mut c| {
                        redis::cmd("HSET")
                            .arg(res)
                            .arg("value")
                            .arg("5")
                            .query::<i64>(&mut c)
                    });
                assert!(wrote.is_ok(), "{wrote:?}");
            }
            let left: u64 = v.and_then(|s| s.parse().ok()).unwrap_or(0);
            (left - 1).to_string()
        })
        .await
        .map_err(e2s)?;
    let end = b.fenced_get(res).await.map_err(e2s)?.ok_or("no value")?;
    if end.value != "4" || calls != 2 {
        return Err(format!(
            "after a write between read and write: {w:?}, value {}, {calls} calls",
            end.value
        ));
    }
    Ok(outcomes.join("; "))
}

/// Waits until `replica` has caught up with its primary at `primary_url`.
async fn caught_up(primary_url: &str, replica_url: &str) -> Res<()> {
    let offset = |info: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix("master_repl_offset:"))
            .and_then(|v| v.trim().parse::<i64>().ok())
    };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        let p: String = cmd(primary_url, &["INFO", "replication"]).await?;
        let r: String = cmd(replica_url, &["INFO", "replication"]).await?;
        if r.contains("master_link_status:up") && offset(&p).is_some() && offset(&p) == offset(&r) {
            return Ok(());
        }
        sleep(Duration::from_millis(50)).await;
    }
    Err("the replica did not catch up within 10 s".into())
}

/// A primary, and a replica whose wall clock is an hour behind it, replicating through a
/// proxy that can freeze the link.
async fn pair_with_slow_replica() -> Res<(Redis, Redis, lock_conformance::proxy::Proxy)> {
    let primary = start(1).await?.remove(0);
    let link = lock_conformance::proxy::Proxy::start(primary.addr())
        .await
        .map_err(e2s)?;
    let port = link.addr().port();
    let env = crate::servers::clock_offset_env(-3600)?;
    let replica = blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Redis::start_replica_with(port, &env)
    })
    .await?;
    caught_up(&primary.url(), &replica.url()).await?;
    Ok((primary, replica, link))
}

/// Failover to a replica whose clock is behind the old primary's last token. The fence
/// refuses a stale write after a failover only if the new primary issues higher tokens:
/// from a replica that had the last grant (what `replica_acks` makes sure of), or from a
/// clock ahead of the old primary's. Without either, tokens go backwards; this check shows
/// both cases.
pub(crate) async fn failover_to_a_replica_whose_clock_is_behind() -> Res<String> {
    let mut report = Vec::new();
    for acks in [false, true] {
        let (mut primary, replica, link) = pair_with_slow_replica().await?;
        let mut cfg = RedisConfig::new(primary.url());
        if acks {
            cfg = cfg.replica_acks(1, Duration::from_millis(500));
        } else {
            // The grant stays on the primary.
            link.set_cut(true);
        }
        let a = LockClient::new(RedisBackend::connect_with(cfg).await.map_err(e2s)?)
            .with_options(LockOptions::default().wait(WaitPolicy::NoWait));
        let ga = a.acquire("failover").await.map_err(|e| format!("A: {e}"))?;
        let ta = ga.token();
        ga.release().await.map_err(e2s)?;
        if acks {
            caught_up(&primary.url(), &replica.url()).await?;
        }
        primary.proc.kill9();
        let _: String = cmd(&replica.url(), &["REPLICAOF", "NO", "ONE"]).await?;
        let b = LockClient::new(RedisBackend::connect(&replica.url()).await.map_err(e2s)?);
        let gb = b.acquire("failover").await.map_err(|e| format!("B: {e}"))?;
        let tb = gb.token();
        gb.release().await.map_err(e2s)?;
        match (acks, tb > ta) {
            (true, true) => report.push(format!("with replica_acks: {ta} -> {tb}")),
            (false, false) => report.push(format!(
                "without: {ta} -> {tb} (backwards by {} s: the limit the docs state)",
                (ta.get() - tb.get()) / 1_000_000
            )),
            (true, false) => {
                return Err(format!(
                    "with replica_acks the token still went from {ta} to {tb}"
                ))
            }
            (false, true) => {
                return Err(format!(
                    "the unreplicated grant's token {ta} was followed by {tb}: is the replica's clock really behind?"
                ))
            }
        }
    }
    Ok(report.join("; "))
}

/// The same server listed twice (under two names) would count twice in every majority:
/// connect refuses it.
pub(crate) async fn redlock_refuses_one_server_listed_twice() -> Res<String> {
    let nodes = start(2).await?;
    let twice = format!("redis://localhost:{}", nodes[0].port);
    let urls = [nodes[0].url(), twice, nodes[1].url()];
    let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
    match RedlockBackend::connect(&refs).await {
        Err(LockError::InvalidConfig(m)) if m.contains("same server") => Ok(m),
        Err(e) => Err(format!("refused without saying why: {e}")),
        Ok(_) => Err("connected with one server listed twice".into()),
    }
}
