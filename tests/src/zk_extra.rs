//! ZooKeeper checks that need control of the servers or the connection: leader loss,
//! partitions shorter and longer than the session timeout, a lost create reply, the herd.

use std::sync::Arc;
use std::time::Duration;

use lock_conformance::proxy::Proxy;
use lock_conformance::CaseResult;
use lock_core::{LockClient, LockError, LockKey, LockOptions, LockStatus, WaitPolicy};
use lock_zk::ZkBackend;
use tokio::time::{sleep, Instant};

use crate::check;
use crate::servers::ZooKeeper;
use crate::targets::{addr_of, zk_config, ZK_SESSION};

type Res<T> = Result<T, String>;

fn e2s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn opts() -> LockOptions {
    LockOptions::default().wait(WaitPolicy::Timeout(Duration::from_secs(20)))
}

async fn backend(connect: &str) -> Res<ZkBackend> {
    ZkBackend::connect_with(zk_config(connect))
        .await
        .map_err(e2s)
}

/// A backend whose every connection goes through proxies (one per member).
async fn proxied(connect: &str) -> Res<(ZkBackend, Vec<Proxy>)> {
    let mut proxies = Vec::new();
    for a in connect.split(',') {
        let addr = addr_of(&format!("tcp://{a}"))?;
        proxies.push(Proxy::start(addr).await.map_err(e2s)?);
    }
    let via = proxies
        .iter()
        .map(|p| p.addr().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let b = ZkBackend::connect_with(zk_config(&via).op_timeout(Duration::from_millis(800)))
        .await
        .map_err(e2s)?;
    Ok((b, proxies))
}

fn key(tag: &str) -> String {
    format!("{tag}-{:08x}", rand::random::<u32>())
}

use lock_conformance::record_statuses as record;

/// Runs every ZooKeeper-specific check against the servers at `connect`. The checks that
/// need control of the server processes run only when `zk` holds them (servers this run
/// started); otherwise each is reported skipped by name, with the reason.
pub async fn run(connect: &str, zk: Option<ZooKeeper>, name: &str) -> Vec<CaseResult> {
    let mut out = vec![
        check(
            name,
            "partition_shorter_than_session_uncertain_then_held",
            short_partition(connect),
        )
        .await,
        check(
            name,
            "partition_longer_than_session_lost_before_next_grant",
            long_partition(connect),
        )
        .await,
        check(
            name,
            "lost_create_reply_leaves_one_node",
            lost_create_reply(connect),
        )
        .await,
        check(
            name,
            "a_release_its_caller_gave_up_on_still_frees_the_key",
            abandoned_release(connect),
        )
        .await,
        check(
            name,
            "a_wait_given_up_during_a_partition_leaves_no_node",
            abandoned_wait(connect),
        )
        .await,
        check(
            name,
            "an_acquire_given_up_before_its_create_was_answered_leaves_no_node",
            abandoned_create(connect),
        )
        .await,
        check(
            name,
            "each_release_fires_exactly_one_of_64_watches",
            herd(connect),
        )
        .await,
        check(
            name,
            "client_library_closes_session_on_drop",
            drop_closes(connect),
        )
        .await,
        check(
            name,
            "client_library_rearms_watches_after_reconnect",
            watch_rearmed(connect),
        )
        .await,
        check(
            name,
            "digest_auth_creator_acl_and_chroot",
            digest_chroot(connect),
        )
        .await,
        check(
            name,
            "session_declared_lost_is_closed_for_real",
            lost_session_is_closed(connect),
        )
        .await,
        check(
            name,
            "paused_holder_wakes_to_lost_past_the_session_timeout",
            paused_holder_wakes_to_lost(connect),
        )
        .await,
    ];
    let ensemble = connect.split(',').count() > 1;
    let case = "tls_with_a_private_ca_and_client_certificates";
    if zk.is_none() {
        out.push(crate::skip(
            name,
            case,
            "starts a ZooKeeper server of its own: needs the local ZooKeeper (--via local)",
        ));
    } else if !ensemble {
        out.push(check(name, case, crate::zk_net::tls_with_a_private_ca()).await);
    }
    if ensemble {
        let case = "leader_killed_while_held_no_double_grant";
        out.push(match zk {
            Some(mut zk) => check(name, case, leader_killed(&mut zk)).await,
            None => crate::skip(
                name,
                case,
                "kills the leader process: needs servers this run started (--via local)",
            ),
        });
    } else {
        out.push(
            check(
                name,
                "distlock_runs_a_command_under_the_lock",
                crate::distlock_checks::smoke(format!("zk://{connect}"), &[]),
            )
            .await,
        );
    }
    out
}

async fn short_partition(connect: &str) -> Res<String> {
    let (a, proxies) = proxied(connect).await?;
    let b = LockClient::new(backend(connect).await?).with_options(opts());
    let a = LockClient::new(a).with_options(opts());
    let k = key("short");
    let g = a.acquire(&k).await.map_err(e2s)?;
    let seen = record(&g);
    // Cut until the holder notices (an unanswered check of its node), then healed at once:
    // well before the holder's deadline (half the session timeout after its last check).
    for p in &proxies {
        p.set_cut(true);
    }
    let cut_at = Instant::now();
    while g.status() == LockStatus::Held && cut_at.elapsed() < ZK_SESSION {
        sleep(Duration::from_millis(20)).await;
    }
    let cut_for = cut_at.elapsed();
    let during = g.status();
    let contended = matches!(b.try_acquire(&k).await, Err(LockError::Contended { .. }));
    for p in &proxies {
        p.set_cut(false);
    }
    // Wait for Held again.
    let t = Instant::now();
    while g.status() != LockStatus::Held && t.elapsed() < ZK_SESSION * 2 {
        sleep(Duration::from_millis(50)).await;
    }
    let after = g.status();
    let still_contended = matches!(b.try_acquire(&k).await, Err(LockError::Contended { .. }));
    g.release().await.map_err(e2s)?;
    let seen: Vec<LockStatus> = seen
        .await
        .map_err(e2s)?
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    if during != LockStatus::Uncertain || after != LockStatus::Held {
        return Err(format!(
            "status during the cut {during:?}, after {after:?}; seen {seen:?}"
        ));
    }
    if !contended || !still_contended {
        return Err("another client could take the key while the holder's session lived".into());
    }
    Ok(format!("cut {} ms: {seen:?}", cut_for.as_millis()))
}

async fn long_partition(connect: &str) -> Res<String> {
    let (a, proxies) = proxied(connect).await?;
    let b = LockClient::new(backend(connect).await?).with_options(opts());
    let a = LockClient::new(a).with_options(opts());
    let k = key("long");
    let g = a.acquire(&k).await.map_err(e2s)?;
    let seen = record(&g);
    let waiter = {
        let (b, k) = (b.clone(), k.clone());
        tokio::spawn(async move {
            let g = b.acquire(&k).await?;
            let at = Instant::now();
            Ok::<_, LockError>((g, at))
        })
    };
    sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    for p in &proxies {
        p.set_cut(true);
    }
    let (g2, granted_at) = waiter.await.map_err(e2s)?.map_err(e2s)?;
    for p in &proxies {
        p.set_cut(false);
    }
    let seen = seen.await.map_err(e2s)?;
    let lost_at = seen
        .iter()
        .find(|(_, s)| matches!(s, LockStatus::Lost(_)))
        .map(|(at, _)| *at)
        .ok_or(format!("holder never reported Lost: {seen:?}"))?;
    let uncertain = seen.iter().any(|(_, s)| *s == LockStatus::Uncertain);
    g2.release().await.map_err(e2s)?;
    drop(g);
    if !uncertain || lost_at >= granted_at {
        return Err(format!(
            "Uncertain seen: {uncertain}; Lost at +{} ms, next grant at +{} ms",
            (lost_at - t).as_millis(),
            (granted_at - t).as_millis()
        ));
    }
    Ok(format!(
        "Uncertain, Lost at +{} ms, next holder granted at +{} ms (session {} ms)",
        (lost_at - t).as_millis(),
        (granted_at - t).as_millis(),
        ZK_SESSION.as_millis()
    ))
}

async fn lost_create_reply(connect: &str) -> Res<String> {
    let (a, proxies) = proxied(connect).await?;
    let observer = backend(connect).await?;
    let k = key("create");
    let parent = observer.key_path(&LockKey::new(&*k).map_err(e2s)?);
    let client = LockClient::new(a).with_options(opts());
    // Create the key's parent first, so that the create under test succeeds on the server.
    client
        .acquire(&k)
        .await
        .map_err(e2s)?
        .release()
        .await
        .map_err(e2s)?;
    for p in &proxies {
        p.set_drop_replies(true);
    }
    let acquiring = {
        let (c, k) = (client.clone(), k.clone());
        tokio::spawn(async move { c.acquire(&k).await })
    };
    // The create reaches the server; its reply is thrown away. Then the connection breaks
    // and the client reconnects (same session).
    sleep(Duration::from_millis(400)).await;
    let lost: u64 = proxies.iter().map(Proxy::dropped_reply_bytes).sum();
    for p in &proxies {
        p.set_drop_replies(false);
        p.reset_all();
    }
    // A create reply carries the path and a stat (over 100 bytes); a bare error or ping
    // reply is 20.
    if lost < 100 {
        return Err(format!(
            "only {lost} reply bytes dropped: the create's reply was not among them"
        ));
    }
    let g = acquiring
        .await
        .map_err(e2s)?
        .map_err(|e| format!("acquire: {e}"))?;
    let zk = observer_client(connect).await?;
    let nodes = zk.list_children(&parent).await.map_err(e2s)?;
    g.release().await.map_err(e2s)?;
    let after = zk.list_children(&parent).await.unwrap_or_default();
    if nodes.len() != 1 || !after.is_empty() {
        return Err(format!(
            "nodes while held {nodes:?}, after release {after:?}"
        ));
    }
    Ok(format!(
        "{lost} reply bytes dropped; one node ({}) held; none after release",
        nodes[0]
    ))
}

/// The status of `g` once it is `Held` again after a reconnect (it reads `Uncertain` until
/// its next check), or whatever it reads after a session timeout.
async fn held_again(g: &lock_core::LockGuard) -> LockStatus {
    let until = Instant::now() + ZK_SESSION;
    loop {
        let s = g.status();
        if s == LockStatus::Held || Instant::now() >= until {
            return s;
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// Ends the cut connections (the reset taken while still cut, so nothing held in them is
/// delivered), then heals the cut; returns when.
async fn reset_then_heal(proxies: &[Proxy]) -> Instant {
    for p in proxies {
        p.reset_all();
    }
    sleep(Duration::from_millis(200)).await;
    for p in proxies {
        p.set_cut(false);
    }
    Instant::now()
}

/// After the connection of `same_session`'s client came back at `healed`: another client
/// is granted `k` within a session timeout, and `same_session` is confirmed `Held` again,
/// so the key was freed by a delete, not by closing the session (which would end that
/// lock). Releases both; returns how long the key took to come free.
async fn freed_by_a_delete(
    connect: &str,
    k: &str,
    healed: Instant,
    same_session: lock_core::LockGuard,
    stuck: &str,
) -> Res<Duration> {
    let next = LockClient::new(backend(connect).await?)
        .with_options(opts().wait(WaitPolicy::Timeout(ZK_SESSION * 2)));
    let g = next.acquire(k).await.map_err(|e| format!("{stuck}: {e}"))?;
    let free_after = healed.elapsed();
    g.release().await.map_err(e2s)?;
    let status = held_again(&same_session).await;
    if status != LockStatus::Held || free_after >= ZK_SESSION {
        return Err(format!(
            "the key free after {} ms; the same session's other lock is {status:?}",
            free_after.as_millis()
        ));
    }
    same_session.release().await.map_err(e2s)?;
    Ok(free_after)
}

/// A release whose caller stops waiting (its operation timeout, shorter than the
/// backend's) while the connection is cut, the delete then lost with the connection: the
/// node must still go once the client reconnects, on the same session, or it would block
/// the key for as long as the process's session lives.
async fn abandoned_release(connect: &str) -> Res<String> {
    let (a, proxies) = proxied(connect).await?;
    let k = key("abandoned-release");
    let client = LockClient::new(a).with_options(opts().op_timeout(Duration::from_millis(200)));
    // A second lock on the same session: it must live through all this.
    let other_key = client.acquire(&key("same-session")).await.map_err(e2s)?;
    let g = client.acquire(&k).await.map_err(e2s)?;
    for p in &proxies {
        p.set_cut(true);
    }
    let released = g.release().await;
    if !matches!(released, Err(LockError::OperationTimeout { .. })) {
        return Err(format!(
            "the release answered {released:?} through a cut connection"
        ));
    }
    // The delete waits in the cut connection, which ends before delivering it.
    let healed = reset_then_heal(&proxies).await;
    let stuck = "the key stayed held after the connection came back";
    let free_after = freed_by_a_delete(connect, &k, healed, other_key, stuck).await?;
    Ok(format!(
        "the key free {} ms after the connection came back (session {} ms); the session's other lock still held",
        free_after.as_millis(),
        ZK_SESSION.as_millis()
    ))
}

/// A waiting acquire given up (its task aborted) while its connection is cut, the
/// delete of its queue node then lost with the connection, and its caller's clean-up
/// given up too (a short operation timeout): once the client reconnects, on the same
/// session, the node must still go, or it would block the key once it came first in line.
async fn abandoned_wait(connect: &str) -> Res<String> {
    let holder = LockClient::new(backend(connect).await?).with_options(opts());
    let (b, proxies) = proxied(connect).await?;
    let k = key("abandoned-wait");
    let g = holder.acquire(&k).await.map_err(e2s)?;
    let waiter = LockClient::new(b).with_options(opts().op_timeout(Duration::from_millis(200)));
    // A second lock on the waiter's session: it must live through all this.
    let same_session = waiter.acquire(&key("same-session")).await.map_err(e2s)?;
    let waiting = {
        let (w, k) = (waiter.clone(), k.clone());
        tokio::spawn(async move { w.acquire(&k).await.map(|g| g.token()) })
    };
    sleep(Duration::from_millis(300)).await;
    let queued = holder
        .inspect(&k)
        .await
        .map_err(e2s)?
        .and_then(|i| i.waiters);
    if queued != Some(1) {
        return Err(format!(
            "{queued:?} waiters queued behind the holder, not 1"
        ));
    }
    for p in &proxies {
        p.set_cut(true);
    }
    waiting.abort();
    // The delete and the clean-up wait in the cut connection, which ends before
    // delivering them.
    sleep(Duration::from_millis(400)).await;
    let healed = reset_then_heal(&proxies).await;
    g.release().await.map_err(e2s)?;
    let stuck = "the given-up waiter's node kept the key";
    let free_after = freed_by_a_delete(connect, &k, healed, same_session, stuck).await?;
    Ok(format!(
        "the key free {} ms after the connection came back; the session's other lock still held",
        free_after.as_millis()
    ))
}

/// An acquire given up while its create is unanswered (carried out by the server, its reply
/// lost), its caller's clean-up given up too, then the connection reset: once the client
/// reconnects, on the same session, the node must still go, or it would hold the key.
async fn abandoned_create(connect: &str) -> Res<String> {
    let (b, proxies) = proxied(connect).await?;
    let k = key("abandoned-create");
    let client = LockClient::new(b).with_options(opts().op_timeout(Duration::from_millis(200)));
    // The key's parent node first, so that the create under test succeeds on the server.
    client
        .acquire(&k)
        .await
        .map_err(e2s)?
        .release()
        .await
        .map_err(e2s)?;
    // A second lock on the same session: it must live through all this.
    let same_session = client.acquire(&key("same-session")).await.map_err(e2s)?;
    for p in &proxies {
        p.set_drop_replies(true);
    }
    let acquiring = {
        let (c, k) = (client.clone(), k.clone());
        tokio::spawn(async move { c.acquire(&k).await.map(|g| g.token()) })
    };
    sleep(Duration::from_millis(150)).await;
    acquiring.abort();
    // The clean-up by lease id goes unanswered too, and gives up after 200 ms.
    sleep(Duration::from_millis(400)).await;
    // The create was carried out: its node is there.
    let parent = backend(connect)
        .await?
        .key_path(&LockKey::new(&*k).map_err(e2s)?);
    let nodes = observer_client(connect)
        .await?
        .list_children(&parent)
        .await
        .map_err(e2s)?;
    if nodes.len() != 1 {
        return Err(format!(
            "nodes under the key before the reconnect: {nodes:?}"
        ));
    }
    for p in &proxies {
        p.set_drop_replies(false);
        p.reset_all();
    }
    let healed = Instant::now();
    let stuck = "the given-up acquire's node kept the key";
    let free_after = freed_by_a_delete(connect, &k, healed, same_session, stuck).await?;
    Ok(format!(
        "node {} left by the create; the key free {} ms after the connection came back; the session's other lock still held",
        nodes[0],
        free_after.as_millis()
    ))
}

async fn observer_client(connect: &str) -> Res<lock_zk::zookeeper_client::Client> {
    lock_zk::zookeeper_client::Client::connect(connect)
        .await
        .map_err(e2s)
}

async fn herd(connect: &str) -> Res<String> {
    const WAITERS: usize = 64;
    let b = backend(connect).await?;
    let c = LockClient::new(b.clone())
        .with_options(opts().wait(WaitPolicy::Timeout(Duration::from_secs(60))));
    let k = key("herd");
    let holder = c.acquire(&k).await.map_err(e2s)?;
    let watches_before = b.watches_set();
    let mut tasks = Vec::new();
    for _ in 0..WAITERS {
        let (c, k) = (c.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            let g = c.acquire(&k).await?;
            sleep(Duration::from_millis(2)).await;
            g.release().await?;
            Ok::<_, LockError>(())
        }));
    }
    // A waiter whose node is queued but whose watch is not set yet would find its turn by
    // looking, not by a watch: release only once every waiter watches its predecessor.
    let t = Instant::now();
    loop {
        let n = c
            .inspect(&k)
            .await
            .map_err(e2s)?
            .and_then(|i| i.waiters)
            .unwrap_or(0);
        let watching = b.watches_set() - watches_before;
        if n == WAITERS && watching == WAITERS as u64 {
            break;
        }
        if t.elapsed() > Duration::from_secs(20) {
            return Err(format!(
                "only {n} of {WAITERS} waiters queued, {watching} watching"
            ));
        }
        sleep(Duration::from_millis(50)).await;
    }
    let before = b.watch_wakeups();
    holder.release().await.map_err(e2s)?;
    for t in tasks {
        t.await.map_err(e2s)?.map_err(e2s)?;
    }
    let fired = b.watch_wakeups() - before;
    if fired != WAITERS as u64 {
        return Err(format!("{fired} watch wake-ups for {WAITERS} releases"));
    }
    Ok(format!("{WAITERS} releases fired {fired} watches"))
}

async fn leader_killed(zk: &mut ZooKeeper) -> Res<String> {
    let connect = zk.connect_string();
    let a = LockClient::new(backend(&connect).await?).with_options(opts());
    let b = LockClient::new(backend(&connect).await?)
        .with_options(opts().wait(WaitPolicy::Timeout(Duration::from_secs(30))));
    let k = key("leader");
    let g = a.acquire(&k).await.map_err(e2s)?;
    let token = g.token();
    let holder = Arc::new(g);
    let seen = record(&holder);
    let waiter = {
        let (b, k) = (b.clone(), k.clone());
        tokio::spawn(async move {
            let r = b.acquire(&k).await;
            (r, Instant::now())
        })
    };
    sleep(Duration::from_millis(300)).await;
    let leader = zk.leader().ok_or("no leader found")?;
    let t = Instant::now();
    tokio::task::block_in_place(|| zk.kill_member(leader));
    // Give the ensemble time to elect and the holder's session to move.
    sleep(ZK_SESSION * 2).await;
    let status = holder.status();
    let outcome = match status {
        LockStatus::Held => {
            // The session survived the election: the waiter must still be waiting.
            if waiter.is_finished() {
                return Err("the waiter was granted while the holder still held".into());
            }
            let g = Arc::try_unwrap(holder).map_err(|_| "guard shared")?;
            g.release().await.map_err(e2s)?;
            let (r, _) = waiter.await.map_err(e2s)?;
            let g2 = r.map_err(|e| format!("waiter after release: {e}"))?;
            if g2.token() <= token {
                return Err(format!("token {token} -> {}", g2.token()));
            }
            let t2 = g2.token();
            g2.release().await.map_err(e2s)?;
            format!("session survived the election; waiter granted after release, token {token} -> {t2}")
        }
        LockStatus::Lost(_) => {
            let (r, granted_at) = waiter.await.map_err(e2s)?;
            let g2 = r.map_err(|e| format!("waiter: {e}"))?;
            let seen = seen.await.map_err(e2s)?;
            let lost_at = seen
                .iter()
                .find(|(_, s)| matches!(s, LockStatus::Lost(_)))
                .map(|(at, _)| *at)
                .ok_or("no Lost recorded")?;
            if lost_at >= granted_at {
                return Err("the waiter was granted before the holder reported Lost".into());
            }
            g2.release().await.map_err(e2s)?;
            format!(
                "holder reported Lost at +{} ms, waiter granted after it",
                (lost_at - t).as_millis()
            )
        }
        other => {
            return Err(format!(
                "holder {other:?} {:?} after the election",
                t.elapsed()
            ))
        }
    };
    Ok(format!("leader (member {}) killed: {outcome}", leader + 1))
}

/// The client library choice rests on this (docs/decisions/0001-zookeeper-client.md):
/// dropping the last client handle closes the session, so its ephemeral nodes go at once,
/// not a session timeout later.
async fn drop_closes(connect: &str) -> Res<String> {
    use lock_zk::zookeeper_client as zk;
    let observer = observer_client(connect).await?;
    let path = format!("/drop-{:08x}", rand::random::<u32>());
    let c = observer_client(connect).await?;
    c.create(
        &path,
        b"x",
        &zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all()),
    )
    .await
    .map_err(e2s)?;
    let t = Instant::now();
    drop(c);
    while observer.check_stat(&path).await.map_err(e2s)?.is_some() {
        if t.elapsed() > ZK_SESSION {
            return Err("the ephemeral node outlived the dropped client".into());
        }
        sleep(Duration::from_millis(10)).await;
    }
    Ok(format!(
        "ephemeral node gone {} ms after drop",
        t.elapsed().as_millis()
    ))
}

/// And on this: a watch set before a reconnect still fires after it.
async fn watch_rearmed(connect: &str) -> Res<String> {
    use lock_zk::zookeeper_client as zk;
    let (_b, proxies) = proxied(connect).await?;
    let via = proxies
        .iter()
        .map(|p| p.addr().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let watcher_client = zk::Client::connector()
        .with_session_timeout(ZK_SESSION)
        .connect(&via)
        .await
        .map_err(e2s)?;
    let observer = observer_client(connect).await?;
    let path = format!("/watch-{:08x}", rand::random::<u32>());
    observer
        .create(
            &path,
            b"x",
            &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all()),
        )
        .await
        .map_err(e2s)?;
    // The watcher's server may not have applied the create yet: a sync first, so that the
    // watch is one on an existing node.
    watcher_client.sync(&path).await.map_err(e2s)?;
    let (stat, w) = watcher_client
        .check_and_watch_stat(&path)
        .await
        .map_err(e2s)?;
    if stat.is_none() {
        return Err("the node is not there after a sync".into());
    }
    // Break the watcher's connection; it reconnects (same session).
    for p in &proxies {
        p.reset_all();
    }
    sleep(Duration::from_millis(500)).await;
    observer.delete(&path, None).await.map_err(e2s)?;
    let ev = tokio::time::timeout(ZK_SESSION, w.changed())
        .await
        .map_err(|_| "the watch did not fire after the reconnect")?;
    if ev.event_type != zk::EventType::NodeDeleted {
        return Err(format!("watch fired with {ev:?}"));
    }
    Ok("watch set before the reconnect fired NodeDeleted after it".into())
}

/// Digest authentication with a creator-only ACL, under a chroot: the lock works, its node
/// lives under the chroot, a client with the same credentials sees it, and a client with
/// other credentials can neither read nor delete it.
async fn digest_chroot(connect: &str) -> Res<String> {
    use lock_zk::zookeeper_client as zk;
    use lock_zk::{ZkAcl, ZkConfig};
    let chroot = format!("/app-{:08x}", rand::random::<u32>());
    let admin = observer_client(connect).await?;
    admin
        .create(
            &chroot,
            b"",
            &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all()),
        )
        .await
        .map_err(e2s)?;
    let cfg = ZkConfig::new(format!("{connect}{chroot}"))
        .session_timeout(ZK_SESSION)
        .acl(ZkAcl::CreatorAll)
        .digest_auth("locker:s3cret");
    let b = ZkBackend::connect_with(cfg.clone()).await.map_err(e2s)?;
    let c = LockClient::new(b.clone()).with_options(opts());
    let k = key("auth");
    let g = c.acquire(&k).await.map_err(e2s)?;
    let parent = format!("{chroot}{}", b.key_path(&LockKey::new(&*k).map_err(e2s)?));
    let same = zk::Client::connector()
        .with_auth("digest", b"locker:s3cret")
        .connect(connect)
        .await
        .map_err(e2s)?;
    let nodes = same.list_children(&parent).await.map_err(e2s)?;
    let node = nodes
        .first()
        .ok_or("no lock node under the chroot")?
        .clone();
    let stranger = zk::Client::connector()
        .with_auth("digest", b"other:pw")
        .connect(connect)
        .await
        .map_err(e2s)?;
    let read = stranger.get_data(&format!("{parent}/{node}")).await;
    let delete = stranger.delete(&format!("{parent}/{node}"), None).await;
    let info = LockClient::new(ZkBackend::connect_with(cfg.clone()).await.map_err(e2s)?)
        .inspect(&k)
        .await
        .map_err(e2s)?;
    // A lock client with the right user and a wrong password: refused, not retried, and the
    // password not shown.
    let wrong = {
        let mut w = cfg.clone();
        w.digest = Some("locker:wr0ng-pw".into());
        w
    };
    let wrong = match ZkBackend::connect_with(wrong).await {
        Ok(b) => LockClient::new(b)
            .with_options(LockOptions::default().wait(WaitPolicy::NoWait))
            .acquire(&key("auth"))
            .await
            .map(|g| g.token()),
        Err(e) => Err(e),
    };
    let wrong = match wrong {
        Err(e @ LockError::InvalidConfig(_)) if !e.to_string().contains("wr0ng-pw") => {
            e.to_string()
        }
        other => return Err(format!("a wrong password gave {other:?}")),
    };
    g.release().await.map_err(e2s)?;
    let after = same.list_children(&parent).await.unwrap_or_default();
    if !matches!(read, Err(zk::Error::NoAuth)) || !matches!(delete, Err(zk::Error::NoAuth)) {
        return Err(format!(
            "other credentials: read {:?}, delete {delete:?}",
            read.map(|_| ())
        ));
    }
    if info.is_none() || !after.is_empty() {
        return Err(format!("inspect {info:?}; nodes after release {after:?}"));
    }
    Ok(format!(
        "node {parent}/{node}: other credentials refused (NoAuth) for read and delete; same credentials inspect; released by its owner; a wrong password: {wrong}"
    ))
}

/// A holder and a waiter in one process share a session. Their connection is cut until
/// the holder's guard gives the session up (0.9 of the timeout), then healed before the
/// server would expire it: the session must still end for real. No node of it is left,
/// the key frees, and the waiter (waiting forever) is granted on a new session.
async fn lost_session_is_closed(connect: &str) -> Res<String> {
    let timeout = Duration::from_secs(8);
    let mut proxies = Vec::new();
    for a in connect.split(',') {
        proxies.push(
            Proxy::start(addr_of(&format!("tcp://{a}"))?)
                .await
                .map_err(e2s)?,
        );
    }
    let via = proxies
        .iter()
        .map(|p| p.addr().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let b = ZkBackend::connect_with(
        zk_config(&via)
            .session_timeout(timeout)
            .op_timeout(Duration::from_millis(800)),
    )
    .await
    .map_err(e2s)?;
    let old_session = b.session_id().await.map_err(e2s)?;
    let c = LockClient::new(b.clone()).with_options(opts().wait(WaitPolicy::Forever));
    let k = key("closed");
    let g = c.acquire(&k).await.map_err(e2s)?;
    let waiter = {
        let (c, k) = (c.clone(), k.clone());
        tokio::spawn(async move { c.acquire(&k).await })
    };
    let observer = backend(connect).await?;
    let parent = observer.key_path(&LockKey::new(&*k).map_err(e2s)?);
    let watcher = observer_client(connect).await?;
    // The waiter's node is there.
    let t = Instant::now();
    while watcher.list_children(&parent).await.map_err(e2s)?.len() < 2 {
        if t.elapsed() > Duration::from_secs(5) {
            return Err("the waiter never queued".into());
        }
        sleep(Duration::from_millis(20)).await;
    }
    for p in &proxies {
        p.set_cut(true);
    }
    let cut_at = Instant::now();
    let lost = tokio::time::timeout(timeout * 2, g.lost()).await;
    // Heal at once: the server still keeps the session (it has not heard from it for less
    // than its timeout).
    for p in &proxies {
        p.set_cut(false);
    }
    lost.map_err(|_| "the holder never turned Lost")?;
    let healed_after = cut_at.elapsed();
    if healed_after >= timeout {
        return Err(format!(
            "the connection was cut for {healed_after:?}, past the session timeout: the check proves nothing"
        ));
    }
    let granted = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .map_err(|_| {
            "the waiter was not granted within 20 s after the lost session's connection came back"
                .to_string()
        })?
        .map_err(e2s)?
        .map_err(|e| format!("the waiter: {e}"))?;
    let new_session = b.session_id().await.map_err(e2s)?;
    let nodes = watcher.list_children(&parent).await.map_err(e2s)?;
    let mut of_old = 0;
    for n in &nodes {
        if let Ok((_, stat)) = watcher.get_data(&format!("{parent}/{n}")).await {
            if stat.ephemeral_owner == old_session {
                of_old += 1;
            }
        }
    }
    let released = g.release().await;
    granted.release().await.map_err(e2s)?;
    if of_old > 0 {
        return Err(format!("{of_old} node(s) of the lost session are left"));
    }
    if new_session == old_session {
        return Err("the waiter was granted on the session that was declared lost".into());
    }
    Ok(format!(
        "cut for {:.1} s (session {timeout:?}); the lost session's nodes gone, the waiter granted on a new session; the lost guard's release: {released:?}",
        healed_after.as_secs_f64()
    ))
}

/// A holder whose process stalls past the session timeout (its only runtime thread
/// blocked, as a paused process): on waking, `check()` says Lost before the client library
/// or the lock's monitor has run, and the server has expired the session meanwhile.
async fn paused_holder_wakes_to_lost(connect: &str) -> Res<String> {
    let k = key("paused");
    let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
    let (connect2, k2) = (connect.to_owned(), k.clone());
    let holder = std::thread::spawn(move || -> Res<String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(e2s)?;
        rt.block_on(async {
            let c = LockClient::new(backend(&connect2).await?).with_options(opts());
            let g = c.acquire(&k2).await.map_err(e2s)?;
            let _ = held_tx.send(());
            // The process stalls, well past the session timeout.
            std::thread::sleep(ZK_SESSION * 2);
            let first = g.check();
            drop(g);
            Ok(format!("{first:?}"))
        })
    });
    held_rx.await.map_err(|_| "the holder never got the lock")?;
    let other = LockClient::new(backend(connect).await?).with_options(opts());
    let t = Instant::now();
    let g = other
        .acquire(&k)
        .await
        .map_err(|e| format!("the other client: {e}"))?;
    let freed_after = t.elapsed();
    g.release().await.map_err(e2s)?;
    let first = tokio::task::spawn_blocking(move || holder.join())
        .await
        .map_err(e2s)?
        .map_err(|_| "the holder panicked")??;
    if !first.contains("Lost") {
        return Err(format!(
            "the holder woke after {:?} (the server let go after {freed_after:?}) and check() said {first}",
            ZK_SESSION * 2
        ));
    }
    Ok(format!(
        "server let go after {:.1} s; the holder woke to {first}",
        freed_after.as_secs_f64()
    ))
}
