//! Redis checks that need control of the servers: restarts, nodes down, herd counting,
//! replica acknowledgement. Each starts its own servers.

use std::time::Duration;

use lock_conformance::CaseResult;
use lock_core::{LockClient, LockError, LockOptions, WaitPolicy};
use lock_redis::{RedisBackend, RedisConfig, RedlockBackend};
use tokio::time::{sleep, Instant};

use crate::check;
use crate::servers::Redis;

fn opts() -> LockOptions {
    LockOptions::default()
        .lease(Duration::from_secs(2))
        .wait(WaitPolicy::Timeout(Duration::from_secs(10)))
        .op_timeout(Duration::from_secs(2))
}

async fn client(url: &str, fair: bool) -> Result<LockClient, String> {
    let b = RedisBackend::connect_with(RedisConfig::new(url).fair(fair))
        .await
        .map_err(|e| e.to_string())?;
    Ok(LockClient::new(b).with_options(opts()))
}

/// Runs every Redis-specific check.
pub async fn run() -> Vec<CaseResult> {
    vec![
        check(
            "redis-extra",
            "restart_losing_data_reports_loss_and_tokens_still_grow",
            restart_losing_data(),
        )
        .await,
        check(
            "redis-extra",
            "one_release_wakes_exactly_one_of_64_waiters",
            herd(),
        )
        .await,
        check(
            "redis-extra",
            "replica_ack_refuses_unacknowledged_grant",
            replica_ack(),
        )
        .await,
        check(
            "redlock",
            "majority_rules_with_nodes_down",
            redlock_nodes_down(),
        )
        .await,
        check(
            "redlock",
            "tokens_grow_after_a_node_restarts_empty",
            redlock_restart_empty(),
        )
        .await,
        check(
            "redis-extra",
            "fenced_set_refuses_stale_token",
            fenced_set(),
        )
        .await,
        check(
            "redlock",
            "paused_node_does_not_extend_validity",
            redlock_paused_node(),
        )
        .await,
    ]
}

async fn restart_losing_data() -> Result<String, String> {
    let mut server = tokio::task::spawn_blocking(|| Redis::start(false))
        .await
        .map_err(|e| e.to_string())??;
    let c = client(&server.url(), true).await?;
    let g = c.acquire("restart").await.map_err(|e| e.to_string())?;
    let before = g.token();
    server = tokio::task::spawn_blocking(move || server.restart().map(|_| server))
        .await
        .map_err(|e| e.to_string())??;
    let lost = tokio::time::timeout(Duration::from_secs(10), g.lost())
        .await
        .map_err(|_| "the guard did not report loss after the server lost its data")?;
    let g2 = c
        .acquire("restart")
        .await
        .map_err(|e| format!("acquire after restart: {e}"))?;
    let after = g2.token();
    g2.release().await.map_err(|e| e.to_string())?;
    drop(server);
    if after <= before {
        return Err(format!(
            "token went from {before} to {after} across the restart"
        ));
    }
    Ok(format!("lost ({lost:?}); token {before} -> {after}"))
}

async fn herd() -> Result<String, String> {
    let server = tokio::task::spawn_blocking(|| Redis::start(false))
        .await
        .map_err(|e| e.to_string())??;
    let c = client(&server.url(), true).await?;
    let key = "herd";
    let holder = c.acquire(key).await.map_err(|e| e.to_string())?;
    let mut waiters = Vec::new();
    for _ in 0..64 {
        let c = c.clone();
        waiters.push(tokio::spawn(async move {
            let opts = c
                .options()
                .clone()
                .wait(WaitPolicy::Timeout(Duration::from_secs(90)));
            let g = c.acquire_with(key, &opts).await?;
            sleep(Duration::from_millis(5)).await;
            g.release().await?;
            Ok::<_, LockError>(())
        }));
    }
    let t = Instant::now();
    loop {
        let n = c
            .inspect(key)
            .await
            .map_err(|e| e.to_string())?
            .and_then(|i| i.waiters)
            .unwrap_or(0);
        if n == 64 {
            break;
        }
        if t.elapsed() > Duration::from_secs(20) {
            return Err(format!("only {n} of 64 waiters queued"));
        }
        sleep(Duration::from_millis(50)).await;
    }
    let mut conn = lock_redis::redis::Client::open(server.url())
        .map_err(|e| e.to_string())?
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let _: () = lock_redis::redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    holder.release().await.map_err(|e| e.to_string())?;
    for w in waiters {
        w.await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    let took = t.elapsed();
    let stats: String = lock_redis::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let calls = |cmd: &str| -> u64 {
        stats
            .lines()
            .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
            .and_then(|l| l.split("calls=").nth(1))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let wakes = calls("rpush");
    // 64 hand-offs (the holder's release, then each waiter's release): each wakes one
    // waiter, except the last, which finds the queue empty.
    if wakes != 64 {
        return Err(format!(
            "{wakes} wake-ups for 64 hand-offs (expected one per release that had a waiter)"
        ));
    }
    let blpops = calls("blpop");
    let evalsha = calls("evalsha") + calls("eval");
    Ok(format!(
        "64 hand-offs in {:.0} ms: {wakes} wake-ups, {:.1} scripts and {:.1} BLPOPs per hand-off",
        took.as_secs_f64() * 1e3,
        evalsha as f64 / 64.0,
        blpops as f64 / 64.0
    ))
}

async fn replica_ack() -> Result<String, String> {
    let server = tokio::task::spawn_blocking(|| Redis::start(false))
        .await
        .map_err(|e| e.to_string())??;
    let cfg = RedisConfig::new(server.url()).replica_acks(1, Duration::from_millis(200));
    let b = RedisBackend::connect_with(cfg)
        .await
        .map_err(|e| e.to_string())?;
    let c = LockClient::new(b).with_options(opts().wait(WaitPolicy::NoWait));
    match c.acquire("acked").await {
        Err(LockError::Backend { source, .. }) if source.to_string().contains("acknowledged") => {}
        other => {
            return Err(format!(
                "expected an acknowledgement error without replicas, got {other:?}"
            ))
        }
    }
    if c.inspect("acked")
        .await
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Err("the unacknowledged grant was not given back".into());
    }
    // Now with a replica attached.
    let port = server.port;
    let replica = tokio::task::spawn_blocking(move || Redis::start_replica(port))
        .await
        .map_err(|e| e.to_string())??;
    let t = Instant::now();
    loop {
        match c.acquire("acked").await {
            Ok(g) => {
                g.release().await.map_err(|e| e.to_string())?;
                break;
            }
            Err(_) if t.elapsed() < Duration::from_secs(15) => {
                sleep(Duration::from_millis(200)).await
            }
            Err(e) => return Err(format!("with a replica: {e}")),
        }
    }
    drop(replica);
    Ok("refused without a replica, granted with one".into())
}

async fn redlock_nodes_down() -> Result<String, String> {
    let mut nodes = start_nodes(5).await?;
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
    let backend = RedlockBackend::connect(&refs)
        .await
        .map_err(|e| e.to_string())?;
    let c = LockClient::new(backend).with_options(opts().wait(WaitPolicy::NoWait));
    nodes[0].proc.stop();
    let g = c
        .acquire("rl")
        .await
        .map_err(|e| format!("one node down: {e}"))?;
    g.release().await.map_err(|e| e.to_string())?;
    nodes[1].proc.stop();
    nodes[2].proc.stop();
    let t = Instant::now();
    let res = c.acquire("rl").await;
    let took = t.elapsed();
    match res {
        Err(e) if e.is_retryable() => {}
        Err(LockError::Contended { .. }) => {}
        other => {
            return Err(format!(
                "three of five down: expected a refusal, got {other:?}"
            ))
        }
    }
    if took > Duration::from_secs(8) {
        return Err(format!("refusal took {took:?}"));
    }
    for n in &nodes[3..] {
        if n.smoke().is_err() {
            return Err("surviving node unusable".into());
        }
    }
    Ok(format!(
        "granted with 4/5, refused with 2/5 in {:.0} ms",
        took.as_secs_f64() * 1e3
    ))
}

async fn redlock_restart_empty() -> Result<String, String> {
    let mut nodes = start_nodes(3).await?;
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
    let c = LockClient::new(
        RedlockBackend::connect(&refs)
            .await
            .map_err(|e| e.to_string())?,
    )
    .with_options(opts());
    let mut last = 0;
    let mut seen = Vec::new();
    for round in 0..3 {
        let g = c
            .acquire("rl-restart")
            .await
            .map_err(|e| format!("round {round}: {e}"))?;
        let t = g.token().get();
        if t <= last {
            return Err(format!("token {t} after {last} (round {round})"));
        }
        last = t;
        seen.push(t);
        g.release().await.map_err(|e| e.to_string())?;
        let mut n = nodes.remove(round);
        n = tokio::task::spawn_blocking(move || n.restart().map(|_| n))
            .await
            .map_err(|e| e.to_string())??;
        nodes.insert(round, n);
    }
    Ok(format!(
        "tokens {seen:?} with a node restarted empty after each grant"
    ))
}

async fn fenced_set() -> Result<String, String> {
    let server = tokio::task::spawn_blocking(|| Redis::start(false))
        .await
        .map_err(|e| e.to_string())??;
    let b = RedisBackend::connect(&server.url())
        .await
        .map_err(|e| e.to_string())?;
    let c = LockClient::new(b.clone())
        .with_options(opts().lease(Duration::from_millis(300)).auto_renew(false));
    let old = c.acquire("stock").await.map_err(|e| e.to_string())?;
    b.fenced_set("stock:value", old.token(), "10")
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    sleep(Duration::from_millis(400)).await; // old's lease ends
    let new = c.acquire("stock").await.map_err(|e| e.to_string())?;
    b.fenced_set("stock:value", new.token(), "9")
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let refused = b
        .fenced_set("stock:value", old.token(), "stale")
        .await
        .map_err(|e| e.to_string())?;
    let rejected = refused
        .err()
        .ok_or("the stale token's write was accepted")?;
    if rejected.highest != new.token() {
        return Err(format!(
            "refusal names highest {} instead of {}",
            rejected.highest,
            new.token()
        ));
    }
    let mut conn = b.connection();
    let v: String = lock_redis::redis::cmd("GET")
        .arg("stock:value")
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    if v != "9" {
        return Err(format!("value is {v:?} after the stale write"));
    }
    new.release().await.map_err(|e| e.to_string())?;
    Ok(format!("stale token refused: {rejected}"))
}

async fn redlock_paused_node() -> Result<String, String> {
    let nodes = start_nodes(5).await?;
    let cfgs = nodes
        .iter()
        .map(|n| RedisConfig::new(n.url()).op_timeout(Duration::from_millis(800)))
        .collect();
    let backend = RedlockBackend::connect_with(cfgs)
        .await
        .map_err(|e| e.to_string())?;
    let pid = nodes[0].proc.pid().ok_or("no pid")?;
    crate::servers::signal(pid, "STOP")?;
    let lease = Duration::from_secs(3);
    let c = LockClient::new(backend).with_options(opts().lease(lease).wait(WaitPolicy::NoWait));
    let before = Instant::now();
    let res = c.acquire("paused").await;
    let took = before.elapsed();
    crate::servers::signal(pid, "CONT")?;
    let g = res.map_err(|e| format!("4 of 5 nodes answer, yet: {e}"))?;
    let safe = g.safe_until().ok_or("no safe_until")?;
    // The validity is measured from before the first request went out, so waiting on the
    // paused node ate into it rather than extending it.
    if safe > before + lease {
        return Err(format!(
            "safe_until is {:?} past the bound",
            safe - (before + lease)
        ));
    }
    g.release().await.map_err(|e| e.to_string())?;
    let short = LockClient::new(
        RedlockBackend::connect_with(
            nodes
                .iter()
                .map(|n| RedisConfig::new(n.url()).op_timeout(Duration::from_millis(800)))
                .collect(),
        )
        .await
        .map_err(|e| e.to_string())?,
    )
    .with_options(
        opts()
            .lease(Duration::from_millis(500))
            .wait(WaitPolicy::NoWait),
    );
    crate::servers::signal(pid, "STOP")?;
    let res = short.acquire("paused-short").await;
    crate::servers::signal(pid, "CONT")?;
    if res.is_ok() {
        return Err("granted a 500 ms lease after waiting 800 ms on a paused node".into());
    }
    Ok(format!(
        "acquire took {:.0} ms with a paused node; lease safe for {:.0} ms of 3000; a 500 ms lease was refused",
        took.as_secs_f64() * 1e3,
        safe.saturating_duration_since(before).as_secs_f64() * 1e3
    ))
}

async fn start_nodes(n: usize) -> Result<Vec<Redis>, String> {
    tokio::task::spawn_blocking(move || {
        (0..n)
            .map(|_| Redis::start(false))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| e.to_string())?
}
