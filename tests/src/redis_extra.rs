//! Redis checks that need control of the servers: restarts, nodes down, herd counting,
//! replica acknowledgement. Each starts its own servers.

use std::time::Duration;

use lock_conformance::CaseResult;
use lock_core::{LockClient, LockError, LockOptions, WaitPolicy};
use lock_redis::{RedisBackend, RedisConfig};
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

type CheckFn = fn() -> lock_conformance::BoxFuture<'static, Result<String, String>>;

/// Every Redis-specific check: (target, name, check). Each starts the servers it needs.
fn checks() -> Vec<(&'static str, &'static str, CheckFn)> {
    use crate::redis_safety as s;
    vec![
        ("redlock", "majority_counts_configured_nodes", || {
            Box::pin(s::redlock_majority_counts_configured_nodes())
        }),
        (
            "redlock",
            "restarted_empty_node_sits_out_until_the_longest_lease_ends",
            || Box::pin(s::redlock_restarted_node_sits_out()),
        ),
        (
            "redlock",
            "a_client_with_a_shorter_max_lease_sits_out_the_longest_seen",
            || Box::pin(s::redlock_shorter_max_lease_learns_the_longest()),
        ),
        (
            "redis-extra",
            "eviction_policies_refused_at_connect",
            || Box::pin(s::eviction_policies_refused_at_connect()),
        ),
        ("redis-extra", "cluster_mode_refused_at_connect", || {
            Box::pin(s::cluster_mode_refused_at_connect())
        }),
        ("redis-extra", "token_records_expire", || {
            Box::pin(s::token_records_expire())
        }),
        ("redis-extra", "tokens_exact_beyond_2_pow_53", || {
            Box::pin(s::tokens_exact_beyond_2_pow_53())
        }),
        ("redis-extra", "server_clock_far_ahead_is_refused", || {
            Box::pin(s::clock_far_ahead_is_refused())
        }),
        ("redis-extra", "fence_lives_with_its_data", || {
            Box::pin(s::fence_lives_with_its_data())
        }),
        (
            "redis-extra",
            "fenced_read_modify_write_loses_no_update",
            || Box::pin(s::fenced_read_modify_write_loses_no_update()),
        ),
        (
            "redis-extra",
            "tls_with_a_private_ca_and_client_certificates",
            || Box::pin(crate::redis_net::tls_with_a_private_ca()),
        ),
        ("redis-extra", "acl_user_and_a_wrong_password", || {
            Box::pin(crate::redis_net::acl_user_and_wrong_password())
        }),
        (
            "redis-extra",
            "built_on_the_applications_own_client",
            || Box::pin(crate::redis_net::built_on_the_applications_client()),
        ),
        ("redlock", "one_server_listed_twice_is_refused", || {
            Box::pin(s::redlock_refuses_one_server_listed_twice())
        }),
        (
            "redis-extra",
            "failover_to_a_replica_whose_clock_is_behind",
            || Box::pin(s::failover_to_a_replica_whose_clock_is_behind()),
        ),
        (
            "redis-extra",
            "restart_losing_data_reports_loss_and_tokens_still_grow",
            || Box::pin(restart_losing_data()),
        ),
        (
            "redis-extra",
            "one_release_wakes_exactly_one_of_64_waiters",
            || Box::pin(herd()),
        ),
        (
            "redis-extra",
            "replica_ack_refuses_unacknowledged_grant",
            || Box::pin(replica_ack()),
        ),
        ("redlock", "majority_rules_with_nodes_down", || {
            Box::pin(redlock_nodes_down())
        }),
        (
            "redlock",
            "a_node_holding_another_writers_value_counts_as_held",
            || Box::pin(redlock_foreign_node()),
        ),
        ("redlock", "tokens_grow_after_a_node_restarts_empty", || {
            Box::pin(redlock_restart_empty())
        }),
        ("redis-extra", "fenced_set_refuses_stale_token", || {
            Box::pin(fenced_set())
        }),
        (
            "redis-extra",
            "a_fenced_resource_named_empty_or_among_the_lock_keys_is_refused",
            || Box::pin(fenced_resource_names()),
        ),
        (
            "redis-extra",
            "a_lock_key_holding_a_value_of_another_writer_is_refused",
            || Box::pin(foreign_value_at_a_lock_key()),
        ),
        ("redlock", "paused_node_does_not_extend_validity", || {
            Box::pin(redlock_paused_node())
        }),
        (
            "redis-extra",
            "batched_operations_stay_exclusive_and_isolated",
            || Box::pin(batched_exact()),
        ),
        (
            "redis-extra",
            "abandoned_batched_acquires_leave_nothing",
            || Box::pin(batched_abandoned()),
        ),
        (
            "redis-extra",
            "batched_grant_whose_caller_left_is_given_back",
            || Box::pin(batched_caller_gone()),
        ),
        (
            "redis-extra",
            "an_undo_of_an_abandoned_acquire_spares_a_later_grant_of_its_lease",
            || Box::pin(undo_spares_a_later_grant()),
        ),
        (
            "redis-extra",
            "an_attempt_under_the_holding_lease_is_granted_again_past_the_queue",
            || Box::pin(holder_attempts_again()),
        ),
        ("distlock", "concurrent_runs_never_overlap", || {
            Box::pin(crate::distlock_checks::runs_never_overlap())
        }),
        ("distlock", "redlock_runs_never_overlap", || {
            Box::pin(crate::distlock_checks::redlock_runs_never_overlap())
        }),
        (
            "distlock",
            "rediss_with_a_private_ca_and_client_certificates",
            || Box::pin(crate::distlock_checks::rediss_with_a_private_ca()),
        ),
        ("distlock", "busy_and_timeout_exit_codes", || {
            Box::pin(crate::distlock_checks::busy_and_timeout_codes())
        }),
        (
            "distlock",
            "a_holder_cut_off_has_its_command_stopped_before_the_lease_ends",
            || Box::pin(crate::distlock_checks::cut_holder_stops_its_command_in_time()),
        ),
        (
            "distlock",
            "sigint_reaches_the_command_and_the_lock_is_released",
            || Box::pin(crate::distlock_checks::sigint_reaches_the_command()),
        ),
        (
            "distlock",
            "bad_input_gets_its_exit_code_and_writes_nothing",
            || Box::pin(crate::distlock_checks::bad_input_codes_and_nothing_written()),
        ),
    ]
}

/// Runs every Redis-specific check; with `skip`, reports each as skipped by name with that
/// reason instead (the checks start local redis-server processes of their own).
pub async fn run(skip: Option<&str>) -> Vec<CaseResult> {
    let mut out = Vec::new();
    for (target, name, f) in checks() {
        out.push(match skip {
            Some(reason) => crate::skip(target, name, reason),
            None => check(target, name, f()).await,
        });
    }
    out
}

/// A holder whose attempt is repeated under its own lease (its answer was lost) is
/// granted again with a higher token, even with another waiter first in the fair queue,
/// and neither queues itself nor lets the waiter in; the waiter gets the key at the release.
async fn holder_attempts_again() -> Result<String, String> {
    use lock_core::{AcquireRequest, Backoff, HolderMeta, LockBackend, LockKey};
    let (_server, b) = server_and_backend().await?;
    let key = LockKey::new("again").map_err(|e| e.to_string())?;
    let req = AcquireRequest::new(
        key.clone(),
        Duration::from_secs(10),
        HolderMeta::default(),
        Backoff::default(),
    );
    let first = b.try_acquire(&req).await.map_err(|e| e.to_string())?;
    let c = LockClient::new(b.clone()).with_options(opts());
    let waiter = tokio::spawn(async move {
        let g = c.acquire("again").await?;
        let t = g.token();
        g.release().await?;
        Ok::<_, LockError>(t)
    });
    let t = Instant::now();
    while b
        .inspect(&key)
        .await
        .map_err(|e| e.to_string())?
        .and_then(|i| i.waiters)
        .unwrap_or(0)
        < 1
    {
        if t.elapsed() > Duration::from_secs(5) {
            return Err("the waiter never showed in the queue".into());
        }
        sleep(Duration::from_millis(10)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let again = tokio::time::timeout(Duration::from_secs(3), b.acquire(&req, Some(deadline)))
        .await
        .map_err(|_| "the holder's repeated attempt waited behind the queue".to_string())?
        .map_err(|e| format!("the holder's repeated attempt: {e}"))?;
    if again.token <= first.token {
        return Err(format!(
            "granted again with token {} (held with {})",
            again.token, first.token
        ));
    }
    let info = b
        .inspect(&key)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the key is free after the repeated attempt")?;
    if info.lease_id != req.lease_id || info.waiters != Some(1) {
        return Err(format!(
            "after the repeated attempt: holder {}, {:?} waiters (want ours and 1)",
            info.lease_id, info.waiters
        ));
    }
    b.release(&req.lease()).await.map_err(|e| e.to_string())?;
    let next = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .map_err(|_| "the waiter did not get the key after the release".to_string())?
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if next <= again.token {
        return Err(format!("waiter's token {next} not above {}", again.token));
    }
    Ok(format!(
        "granted again with token {} (first {}); the waiter then got {next}",
        again.token, first.token
    ))
}

/// A fresh server (no persistence) and a default backend on it.
async fn server_and_backend() -> Result<(Redis, RedisBackend), String> {
    let server = tokio::task::spawn_blocking(|| Redis::start(false))
        .await
        .map_err(|e| e.to_string())??;
    let b = RedisBackend::connect(&server.url())
        .await
        .map_err(|e| e.to_string())?;
    Ok((server, b))
}

/// The `calls=` count of `cmd` in an `INFO commandstats` reply.
fn calls(stats: &str, cmd: &str) -> u64 {
    stats
        .lines()
        .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn commandstats(
    conn: &mut lock_redis::redis::aio::ConnectionManager,
) -> Result<String, String> {
    lock_redis::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())
}

/// 64 tasks on one backend: their acquires and releases share scripts (batches). Each
/// grant must still be exclusive, tokens must grow per key in grant order, and an op on a
/// key of the wrong type must fail alone, with the server's error, in the same batches.
async fn batched_exact() -> Result<String, String> {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    let (server, b) = server_and_backend().await?;
    let mut conn = b.connection();
    // A key of the wrong type where a lock would be, with an expiry as a lock key has (one
    // without is refused before the script touches it): the script fails on its type.
    let _: i64 = lock_redis::redis::cmd("HSET")
        .arg("lock:{clobbered}")
        .arg("x")
        .arg("1")
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let _: i64 = lock_redis::redis::cmd("PEXPIRE")
        .arg("lock:{clobbered}")
        .arg(600_000)
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let c = LockClient::new(b).with_options(opts().wait(WaitPolicy::NoWait));
    let before = calls(&commandstats(&mut conn).await?, "evalsha");
    let held: Arc<Vec<AtomicBool>> = Arc::new((0..4).map(|_| AtomicBool::new(false)).collect());
    let last: Arc<Mutex<HashMap<usize, u64>>> = Arc::default();
    let (grants, refusals, wrong_type) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut tasks = Vec::new();
    for t in 0..64usize {
        let (c, held, last) = (c.clone(), held.clone(), last.clone());
        let (grants, refusals, wrong_type) = (grants.clone(), refusals.clone(), wrong_type.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..150usize {
                if t == 0 && i % 3 == 0 {
                    match c.acquire("clobbered").await {
                        Err(e) if e.to_string().contains("WRONGTYPE") => {
                            wrong_type.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        other => {
                            return Err(format!(
                                "an acquire of a key of the wrong type gave {other:?}"
                            ))
                        }
                    }
                }
                let k = (t + i) % 4;
                let g = match c.acquire(&format!("shared-{k}")).await {
                    Ok(g) => g,
                    Err(LockError::Contended { .. }) => {
                        refusals.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(e) => return Err(format!("acquire: {e}")),
                };
                if held[k].swap(true, Ordering::SeqCst) {
                    return Err(format!("shared-{k} granted while held"));
                }
                {
                    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                    let prev = last.insert(k, g.token().get()).unwrap_or(0);
                    if g.token().get() <= prev {
                        return Err(format!("shared-{k}: token {} after {prev}", g.token()));
                    }
                }
                grants.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
                held[k].store(false, Ordering::SeqCst);
                g.release().await.map_err(|e| format!("release: {e}"))?;
            }
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let scripts = calls(&commandstats(&mut conn).await?, "evalsha") - before;
    let (g, r, w) = (
        grants.load(Ordering::Relaxed),
        refusals.load(Ordering::Relaxed),
        wrong_type.load(Ordering::Relaxed),
    );
    let ops = 2 * g + r + w;
    for k in 0..4 {
        if c.inspect(&format!("shared-{k}"))
            .await
            .map_err(|e| e.to_string())?
            .is_some()
        {
            return Err(format!("shared-{k} still held at the end"));
        }
    }
    if g == 0 || w != 50 {
        return Err(format!("{g} grants, {w} wrong-type errors (expected 50)"));
    }
    if scripts >= ops {
        return Err(format!(
            "{scripts} scripts for {ops} operations: the operations were not batched"
        ));
    }
    drop(server);
    Ok(format!(
        "{g} grants, {r} refusals, {w} wrong-type errors; {ops} operations in {scripts} scripts ({:.1} per script)",
        ops as f64 / scripts.max(1) as f64
    ))
}

/// Acquires abandoned by their callers at random points (queued, in a batch on the wire,
/// answered but unread) leave no lease and no queue entry behind.
async fn batched_abandoned() -> Result<String, String> {
    let (server, b) = server_and_backend().await?;
    let mut conn = b.connection();
    let c = LockClient::new(b).with_options(opts());
    let blocker = c.acquire("ab-held").await.map_err(|e| e.to_string())?;
    let mut tasks = Vec::new();
    for t in 0..128u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            // Free keys and the held one; the callers give up after 0 to 630 µs.
            let key = if t % 8 == 0 {
                "ab-held".to_owned()
            } else {
                format!("ab-{t}")
            };
            let _ =
                tokio::time::timeout(Duration::from_micros((t * 37) % 640), c.acquire(&key)).await;
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())?;
    }
    blocker.release().await.map_err(|e| e.to_string())?;
    // The clean-ups run in the background; leases are 2 s, so a leak shows well inside.
    let t = Instant::now();
    loop {
        let keys: Vec<String> = lock_redis::redis::cmd("KEYS")
            .arg("lock:{ab-*")
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        // Wake notes for waiters that left expire on their own (10 s); fences stay.
        let left: Vec<&String> = keys
            .iter()
            .filter(|k| !k.ends_with(":fence") && !k.contains(":wake:"))
            .collect();
        if left.is_empty() {
            break;
        }
        if t.elapsed() > Duration::from_millis(1200) {
            return Err(format!("left behind after 1.2 s: {left:?}"));
        }
        sleep(Duration::from_millis(50)).await;
    }
    drop(server);
    Ok(format!(
        "128 abandoned acquires; nothing left after {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    ))
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
    let calls = |cmd: &str| calls(&stats, cmd);
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
    let backend = crate::redis_safety::redlock(&urls, Duration::from_secs(2)).await?;
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

/// One node of three holds another writer's value at the lock key, one is held by another
/// client for a short lease: the node with the foreign value counts as held (not as an
/// error that ends the acquire), so the acquire waits and is granted by the other two
/// once that lease ends.
async fn redlock_foreign_node() -> Result<String, String> {
    let nodes = start_nodes(3).await?;
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let backend = crate::redis_safety::redlock(&urls, Duration::from_secs(2)).await?;
    let first = RedisBackend::connect(&urls[0])
        .await
        .map_err(|e| e.to_string())?;
    let other = LockClient::new(first)
        .with_options(opts().lease(Duration::from_millis(1500)).auto_renew(false));
    let held = other.acquire("shared").await.map_err(|e| e.to_string())?;
    let third = RedisBackend::connect(&urls[2])
        .await
        .map_err(|e| e.to_string())?;
    let _: () = lock_redis::redis::cmd("SET")
        .arg("lock:{shared}")
        .arg("another-writer")
        .query_async(&mut third.connection())
        .await
        .map_err(|e| e.to_string())?;
    let c = LockClient::new(backend)
        .with_options(opts().wait(WaitPolicy::Timeout(Duration::from_secs(8))));
    let t = Instant::now();
    let got = c.acquire("shared").await;
    let took = t.elapsed();
    drop(held);
    match got {
        Ok(g) => {
            g.release().await.map_err(|e| e.to_string())?;
            Ok(format!(
                "granted by the two other nodes after {:.0} ms (the other client's lease: 1500 ms)",
                took.as_secs_f64() * 1e3
            ))
        }
        Err(e) => Err(format!("gave {e:?} after {took:?}")),
    }
}

async fn redlock_restart_empty() -> Result<String, String> {
    let mut nodes = start_nodes(3).await?;
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let c = LockClient::new(crate::redis_safety::redlock(&urls, Duration::from_secs(2)).await?)
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
    use lock_redis::FencedWrite;
    let (_server, b) = server_and_backend().await?;
    let c = LockClient::new(b.clone())
        .with_options(opts().lease(Duration::from_millis(300)).auto_renew(false));
    let old = c.acquire("stock").await.map_err(|e| e.to_string())?;
    let w = b
        .fenced_set("stock:value", old.token(), "10")
        .await
        .map_err(|e| e.to_string())?;
    if w != FencedWrite::Applied(1) {
        return Err(format!("the holder's write gave {w:?}"));
    }
    sleep(Duration::from_millis(400)).await; // old's lease ends
    let new = c.acquire("stock").await.map_err(|e| e.to_string())?;
    let w = b
        .fenced_set("stock:value", new.token(), "9")
        .await
        .map_err(|e| e.to_string())?;
    if !w.is_applied() {
        return Err(format!("the new holder's write gave {w:?}"));
    }
    let refused = b
        .fenced_set("stock:value", old.token(), "stale")
        .await
        .map_err(|e| e.to_string())?;
    let FencedWrite::Refused { highest } = refused else {
        return Err(format!("the stale token's write gave {refused:?}"));
    };
    if highest != new.token() {
        return Err(format!(
            "refusal names highest {highest} instead of {}",
            new.token()
        ));
    }
    let v = b
        .fenced_get("stock:value")
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no value")?;
    if v.value != "9" {
        return Err(format!("value is {v:?} after the stale write"));
    }
    new.release().await.map_err(|e| e.to_string())?;
    Ok(format!(
        "stale token {} refused below {highest}",
        old.token()
    ))
}

/// The keys matching `pattern`, sorted.
async fn keys(
    conn: &mut lock_redis::redis::aio::ConnectionManager,
    pattern: &str,
) -> Result<Vec<String>, String> {
    let mut keys: Vec<String> = lock_redis::redis::cmd("KEYS")
        .arg(pattern)
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    keys.sort();
    Ok(keys)
}

/// A fenced resource named "" or inside the lock's own key space (a lock key, one of its
/// helper keys, a node marker) is refused by every fenced call, nothing is written, and the
/// lock it would have named still works.
async fn fenced_resource_names() -> Result<String, String> {
    let (_server, b) = server_and_backend().await?;
    let c = LockClient::new(b.clone()).with_options(opts());
    let g = c.acquire("stock").await.map_err(|e| e.to_string())?;
    let t = g.token();
    g.release().await.map_err(|e| e.to_string())?;
    let mut conn = b.connection();
    let keys_before = keys(&mut conn, "*").await?;
    let mut seen = Vec::new();
    for name in [
        "",
        "lock:{stock}",
        "lock:{stock}:fence",
        "lock:{stock}:q",
        "lock:#node",
    ] {
        let answers = [
            b.fenced_set(name, t, "1").await.map(|_| ()),
            b.fenced_update(name, t, |_| "1".into()).await.map(|_| ()),
            b.fenced_get(name).await.map(|_| ()),
        ];
        for a in answers {
            match a {
                Err(LockError::InvalidKey { .. }) => {}
                other => return Err(format!("resource {name:?} gave {other:?}")),
            }
        }
        seen.push(format!("{name:?}"));
    }
    let keys_after = keys(&mut conn, "*").await?;
    if keys_after != keys_before {
        return Err(format!("keys {keys_before:?} became {keys_after:?}"));
    }
    let g = c.acquire("stock").await.map_err(|e| e.to_string())?;
    if g.token() <= t {
        return Err(format!("token {} after {t}", g.token()));
    }
    g.release().await.map_err(|e| e.to_string())?;
    Ok(format!("refused: {}", seen.join(", ")))
}

/// A lock key that holds a value this library did not write (no expiry: another tool's,
/// under the same namespace): a try and a waiting acquire get a configuration error at
/// once instead of waiting for ever, inspect too, without the value in any message, and
/// the value and the key's helper keys are left as they were.
async fn foreign_value_at_a_lock_key() -> Result<String, String> {
    let (_server, b) = server_and_backend().await?;
    let mut conn = b.connection();
    let secret = "app-value-7f3a";
    let _: () = lock_redis::redis::cmd("SET")
        .arg("lock:{job}")
        .arg(secret)
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let c = LockClient::new(b.clone()).with_options(opts());
    let mut seen = Vec::new();
    for wait in [
        WaitPolicy::NoWait,
        WaitPolicy::Timeout(Duration::from_secs(5)),
    ] {
        let started = Instant::now();
        let res = c
            .acquire_with("job", &opts().wait(wait))
            .await
            .map(|g| g.token());
        match res {
            Err(LockError::InvalidConfig(m))
                if started.elapsed() < Duration::from_secs(3) && !m.contains(secret) =>
            {
                seen.push(m)
            }
            other => {
                return Err(format!(
                    "{wait:?} gave {other:?} after {:?}",
                    started.elapsed()
                ))
            }
        }
    }
    match c.inspect("job").await {
        Err(LockError::InvalidConfig(m)) if !m.contains(secret) => {}
        other => return Err(format!("inspect gave {other:?}")),
    }
    let all = keys(&mut conn, "*").await?;
    let value: Option<String> = lock_redis::redis::cmd("GET")
        .arg("lock:{job}")
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    if value.as_deref() != Some(secret) || all.iter().any(|k| k.starts_with("lock:{job}:")) {
        return Err(format!("left behind: value {value:?}, keys {all:?}"));
    }
    // A waiter queued behind a holder whose key is then overwritten without an expiry: it
    // gets the error at its next look, and leaves the queue.
    let holder = c.acquire("queued").await.map_err(|e| e.to_string())?;
    let c2 = c.clone();
    let waiter = tokio::spawn(async move { c2.acquire("queued").await.map(|g| g.token()) });
    sleep(Duration::from_millis(300)).await;
    let _: () = lock_redis::redis::cmd("SET")
        .arg("lock:{queued}")
        .arg(secret)
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let res = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .map_err(|_| "the queued waiter did not return within 5 s")?
        .map_err(|e| e.to_string())?;
    drop(holder);
    let mut left = keys(&mut conn, "lock:{queued}:*").await?;
    left.retain(|k| k.contains(":q") || k.contains(":w:"));
    match res {
        Err(LockError::InvalidConfig(m)) if !m.contains(secret) && left.is_empty() => {}
        other => return Err(format!("the queued waiter gave {other:?}; left {left:?}")),
    }
    Ok(seen.join(" | "))
}

async fn redlock_paused_node() -> Result<String, String> {
    let nodes = start_nodes(5).await?;
    let urls: Vec<String> = nodes.iter().map(Redis::url).collect();
    let backend = crate::redis_safety::redlock(&urls, Duration::from_millis(800)).await?;
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
    let short =
        LockClient::new(crate::redis_safety::redlock(&urls, Duration::from_millis(800)).await?)
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

/// The batcher's own clean-up, without lock-core's: replies are delayed 200 ms by a proxy,
/// so two acquires fill both slots and 16 more queue; those go out as one batch when a slot
/// frees, and their callers (plain backend calls) give up while it is on the wire. The
/// grants it brings back must be released by the batcher, not left to their 10 s leases.
/// A fresh server, a backend on it through a proxy (operation timeout `op`, its script
/// loaded: a NOSCRIPT retry would add delayed round trips), and a backend straight to it.
async fn behind_proxy(
    op: Duration,
) -> Result<
    (
        Redis,
        lock_conformance::proxy::Proxy,
        RedisBackend,
        RedisBackend,
    ),
    String,
> {
    use lock_core::LockBackend;
    let server = tokio::task::spawn_blocking(|| Redis::start(false))
        .await
        .map_err(|e| e.to_string())??;
    let addr = crate::targets::addr_of(&server.url())?;
    let proxy = lock_conformance::proxy::Proxy::start(addr)
        .await
        .map_err(|e| e.to_string())?;
    let via = crate::targets::with_addr(&server.url(), proxy.addr())?;
    let b = RedisBackend::connect_with(RedisConfig::new(&via).op_timeout(op))
        .await
        .map_err(|e| e.to_string())?;
    let direct = RedisBackend::connect(&server.url())
        .await
        .map_err(|e| e.to_string())?;
    let warm = req10("warm")?;
    b.try_acquire(&warm).await.map_err(|e| e.to_string())?;
    b.release(&warm.lease()).await.map_err(|e| e.to_string())?;
    Ok((server, proxy, b, direct))
}

/// A backend-level request for key `k`, with a 10 s lease.
fn req10(k: &str) -> Result<lock_core::AcquireRequest, String> {
    use lock_core::{AcquireRequest, Backoff, HolderMeta, LockKey};
    Ok(AcquireRequest::new(
        LockKey::new(k).map_err(|e| e.to_string())?,
        Duration::from_secs(10),
        HolderMeta::default(),
        Backoff::default(),
    ))
}

type SlotTask = tokio::task::JoinHandle<Result<lock_core::AcquireRequest, LockError>>;

/// Two acquires on keys of their own, started while replies are delayed: they hold both of
/// the batcher's slots until answered, so the next acquires queue.
fn fill_both_slots(b: &RedisBackend) -> Result<Vec<SlotTask>, String> {
    use lock_core::LockBackend;
    let mut slots = Vec::new();
    for i in 0..2 {
        let (b, r) = (b.clone(), req10(&format!("slot-{i}"))?);
        slots.push(tokio::spawn(
            async move { b.try_acquire(&r).await.map(|_| r) },
        ));
    }
    Ok(slots)
}

/// Waits for [`fill_both_slots`]'s acquires and releases their grants.
async fn free_slots(b: &RedisBackend, slots: Vec<SlotTask>) -> Result<(), String> {
    use lock_core::LockBackend;
    for s in slots {
        let r = s
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("slot acquire: {e}"))?;
        b.release(&r.lease()).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn batched_caller_gone() -> Result<String, String> {
    use lock_core::{LockBackend, LockKey};
    let (server, proxy, b, direct) = behind_proxy(Duration::from_secs(2)).await?;
    proxy.set_reply_delay(Duration::from_millis(200));
    let slots = fill_both_slots(&b)?;
    sleep(Duration::from_millis(30)).await;
    let mut gone = Vec::new();
    for i in 0..16 {
        let (b, r) = (b.clone(), req10(&format!("gone-{i}"))?);
        gone.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(300), b.try_acquire(&r))
                .await
                .is_err()
        }));
    }
    let mut left_early = 0;
    for g in gone {
        if g.await.map_err(|e| e.to_string())? {
            left_early += 1;
        }
    }
    free_slots(&b, slots).await?;
    if left_early != 16 {
        return Err(format!(
            "{left_early} of 16 callers timed out; the delay did not hold them as planned"
        ));
    }
    proxy.set_reply_delay(Duration::ZERO);
    // The batch did reach the server: each key got a token.
    let mut conn = direct.connection();
    let fences: Vec<String> = lock_redis::redis::cmd("KEYS")
        .arg("lock:{gone-*}:fence")
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    if fences.len() != 16 {
        return Err(format!(
            "{} of the 16 abandoned acquires reached the server before their callers left",
            fences.len()
        ));
    }
    let t = Instant::now();
    loop {
        let mut held = Vec::new();
        for i in 0..16 {
            let k = LockKey::new(format!("gone-{i}")).map_err(|e| e.to_string())?;
            if direct
                .inspect(&k)
                .await
                .map_err(|e| e.to_string())?
                .is_some()
            {
                held.push(i);
            }
        }
        if held.is_empty() {
            break;
        }
        if t.elapsed() > Duration::from_secs(2) {
            return Err(format!(
                "gone-{held:?} still held 2 s after their callers left (leases are 10 s)"
            ));
        }
        sleep(Duration::from_millis(50)).await;
    }
    drop(proxy);
    drop(server);
    Ok(format!(
        "16 callers left while their batch was on the wire; all grants given back within {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    ))
}

/// An acquire sent in a batch whose caller left is undone when its late reply comes; the
/// caller's retry under the same lease, sent meanwhile on a free slot, was granted by then.
/// The undo must give back only the abandoned attempt's grant: the retry's grant is the
/// one its caller counts (a Redlock round polls each node this way), and must stay held.
async fn undo_spares_a_later_grant() -> Result<String, String> {
    use lock_core::LockBackend;
    let (server, proxy, b, direct) = behind_proxy(Duration::from_secs(5)).await?;
    // Replies come 500 ms late: two acquires on other keys take both slots, so the first
    // attempt queues and goes out in a batch when one of them is answered (at 500 ms).
    proxy.set_reply_delay(Duration::from_millis(500));
    let slots = fill_both_slots(&b)?;
    sleep(Duration::from_millis(100)).await;
    let ours = req10("undone")?;
    // Left at 700 ms: sent by then, answered at 1 s at the earliest.
    let first = tokio::time::timeout(Duration::from_millis(600), b.try_acquire(&ours)).await;
    if first.is_ok() {
        return Err("the first attempt was answered; the delay did not hold it".into());
    }
    // It went out in a batch and was granted (only the replies are late): its answer, and
    // so the undo, are still to come.
    let granted = direct
        .inspect(&ours.key)
        .await
        .map_err(|e| e.to_string())?
        .filter(|i| i.lease_id == ours.lease_id)
        .ok_or("the abandoned attempt never reached the server: nothing to undo")?;
    // The retry goes out before that answer, so before the undo.
    let retry = b
        .try_acquire(&ours)
        .await
        .map_err(|e| format!("the retry: {e}"))?;
    if retry.token <= granted.token {
        return Err(format!(
            "granted again with token {}, not above the abandoned attempt's {}",
            retry.token, granted.token
        ));
    }
    free_slots(&b, slots).await?;
    proxy.set_reply_delay(Duration::ZERO);
    // Whatever the undo did is done once a request sent after it is answered.
    b.inspect(&ours.key).await.map_err(|e| e.to_string())?;
    let held = direct.inspect(&ours.key).await.map_err(|e| e.to_string())?;
    let result = match held {
        Some(i) if i.lease_id == ours.lease_id && i.token == retry.token => Ok(format!(
            "the retry's grant (token {}) outlived the undo of the abandoned attempt",
            retry.token
        )),
        Some(i) => Err(format!(
            "the retry was granted token {}, but the key is held by lease {} with token {}",
            retry.token, i.lease_id, i.token
        )),
        None => Err(format!(
            "the retry was granted token {}, then the undo of the abandoned attempt gave it back: \
             the key is free while its caller holds it",
            retry.token
        )),
    };
    let _ = direct.release(&ours.lease()).await;
    drop(proxy);
    drop(server);
    result
}
