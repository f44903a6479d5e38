//! PostgreSQL faults that break a lock unless the backend guards against them: a session
//! lock whose holder is paused or cut off past the server's limit, two crashes in a row,
//! a lock held inside the caller's transaction across a crash, a statement timeout inside
//! that transaction, and fenced writes that touch several rows. The crash checks start a
//! server of their own.

use std::time::Duration;

use lock_core::{LockBackend, LockClient, LockError, LockOptions, LockStatus, WaitPolicy};
use lock_pg::{fenced_update, FencedTable, FencedWrite, PgConfig, PgLocks};
use tokio::time::Instant;
use tokio_postgres::NoTls;

use crate::servers::Postgres;
use crate::targets::{addr_of, with_addr, PgMode};

type Res<T> = Result<T, String>;

fn e2s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

async fn admin(url: &str) -> Res<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.map_err(e2s)?;
    tokio::spawn(conn);
    Ok(c)
}

fn key(tag: &str) -> String {
    format!("{tag}-{:08x}", rand::random::<u32>())
}

/// A session-lock client with the server's limit `limit`, probed every `probe`.
async fn session_client(
    url: &str,
    mode: PgMode,
    probe: Duration,
    limit: Duration,
) -> Res<(PgLocks, LockClient)> {
    let locks = PgLocks::connect_with(
        PgConfig::new(url)
            .pool_size(4)
            .op_timeout(Duration::from_secs(2))
            .session(probe, limit),
    )
    .await
    .map_err(e2s)?;
    let c = LockClient::from_arc(mode.backend(&locks)).with_options(
        LockOptions::default()
            .wait(WaitPolicy::Timeout(Duration::from_secs(20)))
            .op_timeout(Duration::from_secs(2)),
    );
    Ok((locks, c))
}

/// A holder whose process stalls past the server's limit (its only runtime thread blocked,
/// as a paused process): on waking, `check()` says Lost before it does anything else, and
/// the server has let the lock go meanwhile.
pub(crate) async fn paused_session_holder_wakes_to_lost(url: &str, mode: PgMode) -> Res<String> {
    let k = key("paused");
    let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
    let (url2, k2) = (url.to_owned(), k.clone());
    let holder = std::thread::spawn(move || -> Res<String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(e2s)?;
        rt.block_on(async {
            let (_locks, c) = session_client(
                &url2,
                mode,
                Duration::from_millis(500),
                Duration::from_secs(2),
            )
            .await?;
            let g = c.acquire(&k2).await.map_err(e2s)?;
            let _ = held_tx.send(());
            // The process stalls, well past the server's limit.
            std::thread::sleep(Duration::from_secs(4));
            let first = g.check();
            drop(g);
            Ok(format!("{first:?}"))
        })
    });
    held_rx.await.map_err(|_| "the holder never got the lock")?;
    let (_locks, other) = session_client(
        url,
        mode,
        Duration::from_millis(500),
        Duration::from_secs(2),
    )
    .await?;
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
            "the holder woke after 4 s (the server let go after {freed_after:?}) and check() said {first}"
        ));
    }
    Ok(format!(
        "server let go after {:.1} s; the holder woke to {first}",
        freed_after.as_secs_f64()
    ))
}

/// A holder whose connection is black-holed: Uncertain, then Lost, before the server frees
/// the lock and a waiting client is granted it.
pub(crate) async fn blackholed_session_holder_lost_before_next_grant(
    url: &str,
    mode: PgMode,
) -> Res<String> {
    let proxy = lock_conformance::proxy::Proxy::start(addr_of(url)?)
        .await
        .map_err(e2s)?;
    let via = with_addr(url, proxy.addr())?;
    let (probe, limit) = (Duration::from_secs(1), Duration::from_secs(3));
    let (_l1, holder) = session_client(&via, mode, probe, limit).await?;
    let (_l2, waiter) = session_client(url, mode, probe, limit).await?;
    let k = key("blackhole");
    let g = holder.acquire(&k).await.map_err(e2s)?;
    let seen = lock_conformance::record_statuses(&g);
    let t = Instant::now();
    proxy.set_cut(true);
    let g2 = waiter
        .acquire(&k)
        .await
        .map_err(|e| format!("waiter: {e}"))?;
    let granted = Instant::now();
    g2.release().await.map_err(e2s)?;
    let lost = tokio::time::timeout(Duration::from_secs(10), g.lost()).await;
    proxy.set_cut(false);
    lost.map_err(|_| "the holder never turned Lost")?;
    let seen = seen.await.map_err(e2s)?;
    let lost_at = seen
        .iter()
        .find(|(_, s)| matches!(s, LockStatus::Lost(_)))
        .map(|(at, _)| *at)
        .ok_or("no Lost status recorded")?;
    let uncertain = seen.iter().any(|(_, s)| *s == LockStatus::Uncertain);
    drop(g);
    if lost_at >= granted {
        return Err(format!(
            "the holder turned Lost {:?} after the cut, the waiter was granted at {:?}",
            lost_at - t,
            granted - t
        ));
    }
    if !uncertain {
        return Err(format!(
            "no Uncertain before Lost: {:?}",
            seen.iter().map(|(_, s)| s).collect::<Vec<_>>()
        ));
    }
    Ok(format!(
        "Uncertain, Lost {:.2} s after the cut; the waiter granted at {:.2} s",
        (lost_at - t).as_secs_f64(),
        (granted - t).as_secs_f64()
    ))
}

/// A server of this check's own.
async fn own_server() -> Res<Postgres> {
    tokio::task::spawn_blocking(Postgres::start)
        .await
        .map_err(e2s)?
}

async fn crash(server: &mut Postgres) -> Res<()> {
    tokio::task::block_in_place(|| server.crash_restart())
}

/// Two immediate shutdowns in a row, with a transaction-scoped grant (whose transaction is
/// still open) between them: no token is issued twice, and tokens keep rising. The clients
/// live through the crashes, so their first grant after each finds the crash marker gone.
pub(crate) async fn two_crashes_never_repeat_a_token() -> Res<String> {
    let mut server = own_server().await?;
    let url = server.url();
    let k = key("crashes");
    let (probe, limit) = (Duration::from_millis(500), Duration::from_secs(2));
    let (_ls, session) = session_client(&url, PgMode::Advisory, probe, limit).await?;
    let (_lx, xact) = session_client(&url, PgMode::Xact, probe, limit).await?;
    let mut seen = Vec::new();
    let grant = |c: LockClient, keep: bool| {
        let k = k.clone();
        async move {
            // The pool's connections died with the server: the first tries may find them
            // closed.
            let t = Instant::now();
            let g = loop {
                match c.acquire(&k).await {
                    Ok(g) => break g,
                    Err(e) if e.is_retryable() && t.elapsed() < Duration::from_secs(10) => {}
                    Err(e) => return Err(e2s(e)),
                }
            };
            let token = g.token().get();
            if keep {
                // Its transaction stays open until the next crash.
                std::mem::forget(g);
            } else {
                g.release().await.map_err(e2s)?;
            }
            Ok::<u64, String>(token)
        }
    };
    seen.push(grant(session.clone(), false).await?);
    for round in 0..3 {
        crash(&mut server).await?;
        let t = grant(xact.clone(), true)
            .await
            .map_err(|e| format!("round {round}: {e}"))?;
        if seen.contains(&t) || seen.last().is_some_and(|l| t <= *l) {
            return Err(format!("round {round}: token {t} after {seen:?}"));
        }
        seen.push(t);
    }
    crash(&mut server).await?;
    let t = grant(session.clone(), false).await?;
    if seen.contains(&t) || seen.last().is_some_and(|l| t <= *l) {
        return Err(format!("after the last crash: token {t} after {seen:?}"));
    }
    seen.push(t);
    Ok(format!("tokens {seen:?}"))
}

/// After a crash, a lock taken inside the caller's transaction (left open) makes nobody
/// else wait: other clients grant within their operation timeout. And a statement timeout
/// inside such a transaction leaves no lock behind on the pooled connection.
pub(crate) async fn caller_transaction_across_a_crash_stalls_nobody() -> Res<String> {
    let mut server = own_server().await?;
    let url = server.url();
    // Schema created, then the crash.
    drop(
        session_client(
            &url,
            PgMode::Advisory,
            Duration::from_millis(500),
            Duration::from_secs(2),
        )
        .await?,
    );
    crash(&mut server).await?;
    let locks = PgLocks::connect_with(PgConfig::new(&url).pool_size(4))
        .await
        .map_err(e2s)?;
    let mut conn = locks.pool().get().await.map_err(e2s)?;
    let tx = conn.transaction().await.map_err(e2s)?;
    let held = locks
        .lock_in_transaction(&tx, &key("in-tx"), WaitPolicy::NoWait)
        .await
        .map_err(|e| format!("lock_in_transaction after the crash: {e}"))?;
    // Meanwhile, other clients.
    let op = Duration::from_secs(2);
    let mut took = Vec::new();
    for mode in [PgMode::Advisory, PgMode::Xact, PgMode::Lease] {
        let (_l, c) = session_client(&url, mode, Duration::from_millis(500), op * 2).await?;
        let o = c.options().clone().op_timeout(op).wait(WaitPolicy::NoWait);
        let c = c.with_options(o);
        let t = Instant::now();
        let g = c
            .acquire(&key("other"))
            .await
            .map_err(|e| format!("{} while a caller's transaction is open: {e}", mode.name()))?;
        took.push(t.elapsed());
        g.release().await.map_err(e2s)?;
    }
    // Another caller's transaction, with a statement timeout.
    let other = PgLocks::connect_with(PgConfig::new(&url).pool_size(2))
        .await
        .map_err(e2s)?;
    let mut conn2 = other.pool().get().await.map_err(e2s)?;
    let pid: i32 = conn2
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(e2s)?
        .get(0);
    {
        let tx2 = conn2.transaction().await.map_err(e2s)?;
        tx2.batch_execute("SET LOCAL statement_timeout = '500ms'")
            .await
            .map_err(e2s)?;
        let r = other
            .lock_in_transaction(&tx2, &key("timed"), WaitPolicy::NoWait)
            .await;
        let _ = tx2.rollback().await;
        if let Err(e) = r {
            if !e.is_retryable() {
                return Err(format!("lock_in_transaction with a statement timeout: {e}"));
            }
        }
    }
    let left: i64 = admin(&url)
        .await?
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1",
            &[&pid],
        )
        .await
        .map_err(e2s)?
        .get(0);
    drop(conn2);
    tx.commit().await.map_err(e2s)?;
    if left > 0 {
        return Err(format!(
            "{left} advisory lock(s) left on the pooled connection after the transaction with the statement timeout rolled back"
        ));
    }
    Ok(format!(
        "token {held} held in a caller's transaction; other clients granted in {took:?}; nothing left after a statement timeout"
    ))
}

async fn fenced_table(url: &str, table: &str) -> Res<tokio_postgres::Client> {
    let a = admin(url).await?;
    a.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; \
         CREATE TABLE {table} (item text PRIMARY KEY, stock int NOT NULL, fence_token bigint); \
         INSERT INTO {table} VALUES ('a', 10, 5), ('b', 10, 9), ('c', 10, NULL)"
    ))
    .await
    .map_err(e2s)?;
    Ok(a)
}

async fn read(a: &tokio_postgres::Client, table: &str) -> Res<Vec<(String, i32)>> {
    let rows = a
        .query(
            &format!("SELECT item, stock FROM {table} ORDER BY item"),
            &[],
        )
        .await
        .map_err(e2s)?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// A fenced update that matches several rows is all or nothing: a token lower than any
/// matching row's changes none of them; a row without a token is refused with an error
/// that says so; parameters used only by `set` or only by the filter work on both paths.
pub(crate) async fn fenced_update_is_all_or_nothing(url: &str) -> Res<String> {
    let table = "fenced_rows";
    let a = fenced_table(url, table).await?;
    let t = lock_core::FencingToken::new;
    let tbl = FencedTable::new(table, "fence_token").map_err(e2s)?;
    // Different parameters in `set` and the filter, on the refusal path.
    let w = fenced_update(&a, &tbl, "stock = $1", "item = $2", &[&1i32, &"b"], t(8))
        .await
        .map_err(|e| format!("a refused write with separate parameters: {e}"))?;
    if w != (FencedWrite::Refused { highest: t(9) }) {
        return Err(format!(
            "a refused write with separate parameters gave {w:?}"
        ));
    }
    let w = fenced_update(
        &a,
        &tbl,
        "stock = $1",
        "item = $2",
        &[&1i32, &"nothing"],
        t(8),
    )
    .await
    .map_err(|e| format!("no row with separate parameters: {e}"))?;
    if w != FencedWrite::NoMatch {
        return Err(format!("no matching row gave {w:?}"));
    }
    let before = read(&a, table).await?;
    let w = fenced_update(
        &a,
        &tbl,
        "stock = stock - 1",
        "item IN ('a', 'b')",
        &[],
        t(7),
    )
    .await
    .map_err(|e| format!("token 7 over rows at 5 and 9: {e}"))?;
    let after = read(&a, table).await?;
    if w != (FencedWrite::Refused { highest: t(9) }) || after != before {
        return Err(format!(
            "token 7 over rows at 5 and 9 gave {w:?}; rows {before:?} -> {after:?}"
        ));
    }
    let w = fenced_update(
        &a,
        &tbl,
        "stock = stock - 1",
        "item IN ('a', 'b')",
        &[],
        t(10),
    )
    .await
    .map_err(e2s)?;
    if w != FencedWrite::Applied(2) {
        return Err(format!("token 10 over rows at 5 and 9 gave {w:?}"));
    }
    // A row without a token.
    match fenced_update(&a, &tbl, "stock = stock - 1", "item = 'c'", &[], t(11)).await {
        Err(LockError::InvalidConfig(m)) if m.contains("NULL") => {}
        other => {
            return Err(format!(
                "a row whose token is NULL must be refused with an error, got {other:?}"
            ))
        }
    }
    let end = read(&a, table).await?;
    let _ = a.batch_execute(&format!("DROP TABLE {table}")).await;
    if end != [("a".into(), 9), ("b".into(), 9), ("c".into(), 10)] {
        return Err(format!("rows ended as {end:?}"));
    }
    Ok(
        "stale token over two rows: refused, neither written; fresh: both; NULL token: error"
            .into(),
    )
}

/// A waiter that waits in the server's queue longer than the session limit keeps the grant
/// it gets: its deadline counts from when the server granted it, not from before the wait
/// (counted from there, the grant arrives "late" and is given back, and the waiter queues
/// again behind anyone who came meanwhile).
pub(crate) async fn long_wait_keeps_its_grant(url: &str, mode: PgMode) -> Res<String> {
    let (probe, limit) = (Duration::from_millis(300), Duration::from_secs(1));
    let (_l1, holder) = session_client(url, mode, probe, limit).await?;
    let (_l2, waiter) = session_client(url, mode, probe, limit).await?;
    let k = key("long-wait");
    let g = holder.acquire(&k).await.map_err(e2s)?;
    let held = g.token().get();
    let w = {
        let (waiter, k) = (waiter.clone(), k.clone());
        tokio::spawn(async move { waiter.acquire(&k).await })
    };
    tokio::time::sleep(limit * 3).await;
    g.release().await.map_err(e2s)?;
    let g2 = w
        .await
        .map_err(e2s)?
        .map_err(|e| format!("the waiter: {e}"))?;
    let next = g2.token().get();
    let status = g2.status();
    g2.release().await.map_err(e2s)?;
    if next != held + 1 || status != LockStatus::Held {
        return Err(format!(
            "held with {held}; the waiter got {next} ({status:?}): its first grant was given back"
        ));
    }
    Ok(format!(
        "waited {:?}; granted {next} right after {held}",
        limit * 3
    ))
}

/// A release cancelled while its statement is on the wire (the caller's timeout) must not
/// return the connection, still holding the lock, to the pool: the key frees.
pub(crate) async fn cancelled_release_frees_the_key(url: &str, mode: PgMode) -> Res<String> {
    use lock_core::{AcquireRequest, Backoff, HolderMeta, LockKey};
    let (locks, _) = session_client(
        url,
        mode,
        Duration::from_millis(500),
        Duration::from_secs(2),
    )
    .await?;
    let b = mode.backend(&locks);
    let k = key("cancelled-release");
    let req = AcquireRequest::new(
        LockKey::new(k.clone()).map_err(e2s)?,
        Duration::from_secs(10),
        HolderMeta::default(),
        Backoff::default(),
    );
    b.try_acquire(&req).await.map_err(e2s)?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Cancelled at its first wait on the server.
    let cancelled = tokio::time::timeout(Duration::ZERO, b.release(&req.lease())).await;
    // The next lock of this client takes the most recently used connection: if that is the
    // one the cancelled release gave back, still holding the lock, its release resets the
    // session's idle limit and the lock is never freed.
    let c = LockClient::from_arc(b.clone());
    for _ in 0..3 {
        c.acquire(&key("reuse"))
            .await
            .map_err(e2s)?
            .release()
            .await
            .map_err(e2s)?;
    }
    let (_l2, other) = session_client(
        url,
        mode,
        Duration::from_millis(500),
        Duration::from_secs(2),
    )
    .await?;
    let t = Instant::now();
    loop {
        match other.try_acquire(&k).await {
            Ok(g) => {
                g.release().await.map_err(e2s)?;
                break;
            }
            Err(LockError::Contended { .. }) if t.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => {
                return Err(format!(
                    "{:?} after a cancelled release ({cancelled:?}): {e}",
                    t.elapsed()
                ))
            }
        }
    }
    Ok(format!(
        "release cancelled ({cancelled:?}); the key free after {:?}",
        t.elapsed()
    ))
}

/// On a server whose default is `synchronous_commit = off` (and whose WAL writer sleeps
/// for 10 s), a lease grant, then a renewal, each the last write before a crash, survive
/// it: the key is still held afterwards.
pub(crate) async fn lease_grants_survive_a_crash_on_asynchronous_commit() -> Res<String> {
    let mut server = tokio::task::spawn_blocking(|| {
        Postgres::start_with(&["synchronous_commit=off", "wal_writer_delay=10000"])
    })
    .await
    .map_err(e2s)??;
    let url = server.url();
    let connect = |lease: Duration| {
        let url = url.clone();
        async move {
            let locks = PgLocks::connect_with(PgConfig::new(&url).pool_size(2))
                .await
                .map_err(e2s)?;
            let c = LockClient::new(locks.lease_rows()).with_options(
                LockOptions::default()
                    .lease(lease)
                    .auto_renew(false)
                    .wait(WaitPolicy::NoWait)
                    .op_timeout(Duration::from_secs(2)),
            );
            Ok::<_, String>((locks, c))
        }
    };
    // Taken by another client after the crash: Some(its token) if it could.
    let taken_after = |k: String| {
        let connect = &connect;
        async move {
            let (_l, other) = connect(Duration::from_secs(60)).await?;
            let t = Instant::now();
            loop {
                match other.acquire(&k).await {
                    Err(LockError::Contended { .. }) => return Ok::<_, String>(None),
                    Ok(g) => return Ok(Some(g.token().get())),
                    // The pool's first connections may have died with the server.
                    Err(e) if e.is_retryable() && t.elapsed() < Duration::from_secs(10) => {}
                    Err(e) => return Err(format!("acquire after the crash: {e}")),
                }
            }
        }
    };
    let flush = || async {
        // A synchronous commit elsewhere flushes the WAL written so far.
        admin(&url)
            .await?
            .batch_execute(
                "SET synchronous_commit = on; CREATE TABLE flushed (); DROP TABLE flushed",
            )
            .await
            .map_err(e2s)
    };
    let (_locks, holder) = connect(Duration::from_secs(60)).await?;
    let mut problems = Vec::new();
    // The grant.
    let k = key("async-grant");
    holder
        .acquire(&key("warm"))
        .await
        .map_err(e2s)?
        .release()
        .await
        .map_err(e2s)?;
    flush().await?;
    let g = holder.acquire(&k).await.map_err(e2s)?;
    let token = g.token().get();
    crash(&mut server).await?;
    if let Some(t2) = taken_after(k).await? {
        problems.push(format!(
            "the grant acknowledged before the crash is gone: another client was granted the \
             key (token {t2}; the holder's {token})"
        ));
    }
    std::mem::forget(g);
    // The renewal: granted for 1.5 s, then extended to 60 s.
    let k2 = key("async-renew");
    let (_short_locks, short) = connect(Duration::from_millis(1500)).await?;
    let granted_at = Instant::now();
    let renewed = short.acquire(&k2).await.map_err(e2s)?;
    flush().await?;
    renewed
        .extend(Duration::from_secs(60))
        .await
        .map_err(|e| format!("extend: {e}"))?;
    crash(&mut server).await?;
    tokio::time::sleep_until(granted_at + Duration::from_secs(2)).await;
    if let Some(t2) = taken_after(k2).await? {
        problems.push(format!(
            "the renewal acknowledged before the crash is gone: another client was granted \
             the key (token {t2}) after its first lease ran out"
        ));
    }
    std::mem::forget(renewed);
    if problems.is_empty() {
        Ok(format!(
            "a grant (token {token}) and a renewal, each the last write before a crash, held \
             across it with synchronous_commit off"
        ))
    } else {
        Err(problems.join("; "))
    }
}

/// A lease acquire abandoned by its caller while its statement runs on the server (slowed
/// here by a trigger past the operation timeout) leaves the key free once that statement
/// commits: when another task of the process takes the connection back at once (so the
/// clean-up release goes out on another connection and reaches the server before the
/// grant), and when the acquire ran on a new connection that had prepared nothing yet.
pub(crate) async fn abandoned_lease_acquire_leaves_the_key_free(url: &str) -> Res<String> {
    let schema = format!("abandon_{:08x}", rand::random::<u32>());
    let locks = PgLocks::connect_with(
        PgConfig::new(url)
            .schema(schema.clone())
            .pool_size(8)
            .op_timeout(Duration::from_secs(1)),
    )
    .await
    .map_err(e2s)?;
    let res = abandoned_acquire(url, &schema, &locks).await;
    drop(locks);
    let cleanup = admin(url)
        .await?
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .map_err(e2s);
    let out = res?;
    cleanup?;
    Ok(out)
}

async fn abandoned_acquire(url: &str, schema: &str, locks: &PgLocks) -> Res<String> {
    let c = LockClient::new(locks.lease_rows()).with_options(
        LockOptions::default()
            .lease(Duration::from_secs(30))
            .op_timeout(Duration::from_secs(1)),
    );
    // The schema is made by the first operation.
    c.acquire("warm-up")
        .await
        .map_err(e2s)?
        .release()
        .await
        .map_err(e2s)?;
    let admin = admin(url).await?;
    admin
        .batch_execute(&format!(
            "CREATE FUNCTION {schema}.slow() RETURNS trigger LANGUAGE plpgsql AS \
               $$ BEGIN PERFORM pg_sleep(1.5); RETURN NEW; END $$;"
        ))
        .await
        .map_err(e2s)?;
    let other = locks.lease_rows();
    for fresh in [false, true] {
        let k = if fresh { "slow-fresh" } else { "slow-reused" };
        admin
            .batch_execute(&format!(
                "CREATE TRIGGER slow BEFORE INSERT ON {schema}.lease FOR EACH ROW \
                   WHEN (NEW.key = '{k}') EXECUTE FUNCTION {schema}.slow();"
            ))
            .await
            .map_err(e2s)?;
        // Every idle connection taken: the acquire opens a new one.
        let mut taken = Vec::new();
        while fresh && locks.pool().status().available > 0 {
            taken.push(locks.pool().get().await.map_err(e2s)?);
        }
        let abandoned = tokio::time::timeout(Duration::from_millis(150), c.acquire(k)).await;
        if let Ok(r) = abandoned {
            return Err(format!("the slowed acquire answered in 150 ms: {r:?}"));
        }
        drop(taken);
        // Another task's lookup runs at once, before the caller's clean-up, on the most
        // recently used connection (it may wait behind the slowed statement: its outcome
        // does not matter).
        let _ = other
            .inspect(&lock_core::LockKey::new("warm-up").map_err(e2s)?)
            .await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        admin
            .batch_execute(&format!("DROP TRIGGER slow ON {schema}.lease"))
            .await
            .map_err(e2s)?;
        if let Err(e) = c.try_acquire(k).await {
            let info = other
                .inspect(&lock_core::LockKey::new(k).map_err(e2s)?)
                .await
                .map_err(e2s)?;
            return Err(format!(
                "the key is still held after the abandoned acquire ({}): {e}; {info:?}",
                if fresh {
                    "new connection"
                } else {
                    "connection taken back"
                }
            ));
        }
    }
    Ok("the key was free once each abandoned statement had committed".into())
}
