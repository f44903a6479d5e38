//! PostgreSQL checks that need control of the server or many clients: backend
//! termination, restart, the lock_timeout race, 200 waiters, fenced inventory writes, the
//! schema and its errors.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use lock_conformance::{CaseResult, Outcome};
use lock_core::{LockClient, LockError, LockOptions, LockStatus, WaitPolicy};
use lock_pg::{
    advisory_id, advisory_lock_parts, fenced_update, FencedTable, FencedWrite, PgConfig, PgLocks,
};
use tokio::time::{sleep, Instant};
use tokio_postgres::NoTls;

use crate::check;
use crate::servers::Postgres;
use crate::targets::{pg_config, PgMode};

type Res<T> = Result<T, String>;

fn e2s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn opts() -> LockOptions {
    LockOptions::default()
        .lease(Duration::from_secs(2))
        .wait(WaitPolicy::Timeout(Duration::from_secs(20)))
        .op_timeout(Duration::from_secs(3))
}

async fn client(url: &str, mode: PgMode) -> Res<(PgLocks, LockClient)> {
    let locks = PgLocks::connect_with(pg_config(url)).await.map_err(e2s)?;
    let c = LockClient::from_arc(mode.backend(&locks)).with_options(opts());
    Ok((locks, c))
}

/// One acquire and release of `key`.
async fn cycle(c: &LockClient, key: &str) -> Res<()> {
    c.acquire(key)
        .await
        .map_err(e2s)?
        .release()
        .await
        .map_err(e2s)?;
    Ok(())
}

/// A plain admin connection.
async fn admin(url: &str) -> Res<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.map_err(e2s)?;
    tokio::spawn(conn);
    Ok(c)
}

/// How `pg_locks` shows `key`'s advisory id: (classid, objid).
fn lock_parts(key: &str) -> (i64, i64) {
    advisory_lock_parts(advisory_id("distlock", key))
}

/// Advisory locks granted on `key`'s id (any mode), and waiters.
async fn advisory_state(url: &str, key: &str) -> Res<(i64, i64)> {
    let (hi, lo) = lock_parts(key);
    let row = admin(url)
        .await?
        .query_one(
            "SELECT count(*) FILTER (WHERE granted), count(*) FILTER (WHERE NOT granted) \
             FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 \
             AND classid::bigint = $1 AND objid::bigint = $2",
            &[&hi, &lo],
        )
        .await
        .map_err(e2s)?;
    Ok((row.get(0), row.get(1)))
}

/// Runs every PostgreSQL-specific check. `server` is the local server when this run
/// started one (restart checks need it).
pub async fn run(url: &str, server: Option<Postgres>) -> Vec<CaseResult> {
    use crate::pg_safety as s;
    // First: the checks below crash and stop the server.
    let mut out = vec![
        check(
            "pg",
            "distlock_runs_a_command_under_the_lock",
            crate::distlock_checks::smoke(url.to_owned(), &[]),
        )
        .await,
    ];
    for mode in [PgMode::Advisory, PgMode::Xact] {
        out.push(
            check(
                mode.name(),
                "paused_holder_wakes_to_lost_past_the_servers_limit",
                s::paused_session_holder_wakes_to_lost(url, mode),
            )
            .await,
        );
        out.push(
            check(
                mode.name(),
                "blackholed_holder_lost_before_the_next_grant",
                s::blackholed_session_holder_lost_before_next_grant(url, mode),
            )
            .await,
        );
        out.push(
            check(
                mode.name(),
                "a_grant_after_a_long_wait_is_kept",
                s::long_wait_keeps_its_grant(url, mode),
            )
            .await,
        );
        out.push(
            check(
                mode.name(),
                "a_cancelled_release_frees_the_key",
                s::cancelled_release_frees_the_key(url, mode),
            )
            .await,
        );
    }
    out.push(
        check(
            "pg",
            "built_on_the_applications_own_config",
            crate::pg_net::built_on_the_applications_config(url),
        )
        .await,
    );
    out.push(
        check(
            "pg-lease",
            "an_abandoned_acquire_leaves_the_key_free",
            s::abandoned_lease_acquire_leaves_the_key_free(url),
        )
        .await,
    );
    out.push(
        check(
            "pg",
            "fenced_update_is_all_or_nothing",
            s::fenced_update_is_all_or_nothing(url),
        )
        .await,
    );
    if server.is_some() {
        out.push(
            check(
                "pg",
                "two_crashes_in_a_row_never_repeat_a_token",
                s::two_crashes_never_repeat_a_token(),
            )
            .await,
        );
        out.push(
            check(
                "pg",
                "lease_grants_survive_a_crash_on_asynchronous_commit",
                s::lease_grants_survive_a_crash_on_asynchronous_commit(),
            )
            .await,
        );
        out.push(
            check(
                "pg",
                "caller_transaction_across_a_crash_stalls_nobody",
                s::caller_transaction_across_a_crash_stalls_nobody(),
            )
            .await,
        );
        out.push(
            check(
                "pg",
                "tls_by_sslmode_and_scram_passwords",
                crate::pg_net::tls_and_scram(),
            )
            .await,
        );
    } else {
        for case in [
            "two_crashes_in_a_row_never_repeat_a_token",
            "caller_transaction_across_a_crash_stalls_nobody",
            "tls_by_sslmode_and_scram_passwords",
        ] {
            out.push(crate::skip(
                "pg",
                case,
                "crashes a server of its own: needs the local PostgreSQL binaries (--via local)",
            ));
        }
    }
    for mode in [PgMode::Advisory, PgMode::Xact] {
        out.push(
            check(
                mode.name(),
                "terminated_backend_turns_guard_lost_and_frees_key",
                terminate(url, mode),
            )
            .await,
        );
        out.push(
            check(
                mode.name(),
                "lock_timeout_race_never_leaves_a_lock_held",
                timeout_race(url, mode),
            )
            .await,
        );
    }
    for mode in PgMode::ALL {
        out.push(
            check(
                mode.name(),
                "200_waiters_on_one_key_leave_the_pool_to_other_keys",
                many_waiters(url, mode),
            )
            .await,
        );
    }
    out.push(
        check(
            "pg",
            "fenced_inventory_refuses_late_holder",
            fenced_inventory(url),
        )
        .await,
    );
    out.push(
        check(
            "pg",
            "lock_in_transaction_sells_each_unit_once",
            in_transaction(url),
        )
        .await,
    );
    out.push(
        check(
            "pg",
            "concurrent_first_use_creates_schema_once",
            concurrent_migrate(url),
        )
        .await,
    );
    out.push(
        check(
            "pg",
            "least_privileged_role_uses_a_schema_migrated_by_another",
            least_privilege(url),
        )
        .await,
    );
    out.push(
        check(
            "pg",
            "bad_config_and_permissions_get_clear_errors",
            bad_config(url),
        )
        .await,
    );
    out.push(
        check(
            "pg",
            "lease_counter_ahead_of_sequence_still_grows_tokens",
            counter_ahead(url),
        )
        .await,
    );
    out.push(
        check(
            "pg",
            "holder_named_at_grant_and_name_given_back_at_release",
            holder_name(url),
        )
        .await,
    );
    out.push(
        check(
            "pg",
            "crash_guard_and_an_older_repeatable_read_snapshot",
            guard_in_old_snapshot(url),
        )
        .await,
    );
    out.push(
        check(
            "pg lease",
            "async_release_commit_stays_in_its_own_transaction",
            async_release(url),
        )
        .await,
    );
    out.push(
        check(
            "pg lease",
            "release_hands_the_row_to_this_process_waiter",
            direct_handoff(url),
        )
        .await,
    );
    out.push(
        check(
            "pg lease",
            "local_contention_leaves_other_processes_their_turn",
            other_process_turn(url),
        )
        .await,
    );
    out.push(
        check(
            "pg lease",
            "release_notifies_only_when_an_acquire_found_the_row_held",
            notify_when_waited(url),
        )
        .await,
    );
    out.push(
        check(
            "pg lease",
            "an_attempt_under_a_held_lease_id_is_granted_again",
            same_lease_again(url),
        )
        .await,
    );
    out.push(
        check(
            "pg advisory",
            "session_tokens_interleave_with_every_other_grant",
            session_and_other_grants(url),
        )
        .await,
    );
    out.push(
        check(
            "pg advisory",
            "uncontended_grants_take_no_transaction_id",
            grants_without_xid(url),
        )
        .await,
    );
    out.push(
        check(
            "pg advisory",
            "a_schema_of_another_version_is_refused",
            other_schema_version(url),
        )
        .await,
    );
    out.push(
        check(
            "pg",
            "a_schema_that_is_not_a_lock_schema_is_refused_and_left_untouched",
            foreign_schema(url),
        )
        .await,
    );
    match server {
        Some(mut s) => {
            let r = check("pg", "restart_while_held_reports_loss_tokens_grow", async {
                restart(url, &mut s).await
            })
            .await;
            out.push(r);
            let r = check(
                "pg advisory",
                "crash_recovery_keeps_session_tokens_growing",
                async { crash_tokens(url, &mut s).await },
            )
            .await;
            out.push(r);
            drop(s);
        }
        None => {
            for (target, case) in [
                ("pg", "restart_while_held_reports_loss_tokens_grow"),
                ("pg advisory", "crash_recovery_keeps_session_tokens_growing"),
            ] {
                let r = CaseResult {
                    target: target.into(),
                    case: case.into(),
                    outcome: Outcome::Skipped {
                        reason: "needs a server this run started (LOCK_PG_URL given)".into(),
                    },
                    millis: 0,
                };
                lock_conformance::print_result(&r);
                out.push(r);
            }
        }
    }
    out
}

/// Session grants between transaction-scoped ones (committed, and rolled back inside the
/// caller's transaction): every token is above the one before, and a rolled-back token is
/// never issued again.
async fn session_and_other_grants(url: &str) -> Res<String> {
    let (locks, session) = client(url, PgMode::Advisory).await?;
    let (_x, xact) = client(url, PgMode::Xact).await?;
    let key = format!("blocks-{}", rand::random::<u32>());
    let grant = |c: &LockClient| {
        let (c, key) = (c.clone(), key.clone());
        async move {
            let g = c.acquire(&key).await.map_err(e2s)?;
            let t = g.token().get();
            g.release().await.map_err(e2s)?;
            Ok::<u64, String>(t)
        }
    };
    let mut seen: Vec<(&str, u64)> = Vec::new();
    seen.push(("session", grant(&session).await?));
    seen.push(("session", grant(&session).await?));
    seen.push(("xact committed", grant(&xact).await?));
    seen.push(("session", grant(&session).await?));
    // Inside the caller's transaction, rolled back.
    let mut conn = locks.pool().get().await.map_err(e2s)?;
    let tx = conn.transaction().await.map_err(e2s)?;
    let rolled = locks
        .lock_in_transaction(&tx, &key, WaitPolicy::NoWait)
        .await
        .map_err(e2s)?;
    tx.rollback().await.map_err(e2s)?;
    drop(conn);
    seen.push(("xact rolled back", rolled.get()));
    seen.push(("session", grant(&session).await?));
    seen.push(("xact committed", grant(&xact).await?));
    seen.push(("session", grant(&session).await?));
    if let Some(again) = seen
        .iter()
        .filter(|(k, _)| *k != "xact rolled back")
        .find(|(_, t)| *t == rolled.get())
    {
        return Err(format!(
            "the rolled-back token {} was issued again ({}): {seen:?}",
            rolled.get(),
            again.0
        ));
    }
    let valid: Vec<(&str, u64)> = seen
        .iter()
        .copied()
        .filter(|(k, _)| *k != "xact rolled back")
        .collect();
    for w in valid.windows(2) {
        if w[1].1 <= w[0].1 {
            return Err(format!(
                "{} token {} is not above {} token {}: {seen:?}",
                w[1].0, w[1].1, w[0].0, w[0].1
            ));
        }
    }
    let list: Vec<String> = seen.iter().map(|(k, t)| format!("{k} {t}")).collect();
    Ok(list.join(", "))
}

/// A server crash (immediate shutdown, then crash recovery) after session grants, most of
/// which wrote no WAL (the sequence logs 32 draws ahead): recovery empties the unlogged
/// tables (the holders, the crash guard's marker), and the first grant after it draws from
/// a sequence moved 2^32 ahead, above any draw whose WAL record the crash lost.
async fn crash_tokens(url: &str, server: &mut Postgres) -> Res<String> {
    let key = format!("crash-{}", rand::random::<u32>());
    let last = {
        let (_l, c) = client(url, PgMode::Advisory).await?;
        let mut last = 0;
        // More than one sequence log interval (32 draws).
        for _ in 0..40 {
            let g = c.acquire(&key).await.map_err(e2s)?;
            last = g.token().get();
            g.release().await.map_err(e2s)?;
        }
        last
    };
    let rows = |url: String| async move {
        let n: i64 = admin(&url)
            .await?
            .query_one("SELECT count(*) FROM distlock.holder", &[])
            .await
            .map_err(e2s)?
            .get(0);
        Ok::<i64, String>(n)
    };
    let before = rows(url.to_owned()).await?;
    if before == 0 {
        return Err("no holder row before the crash".into());
    }
    tokio::task::block_in_place(|| server.crash_restart())?;
    let after = rows(url.to_owned()).await?;
    if after != 0 {
        return Err(format!(
            "{after} holder rows survived crash recovery (expected none)"
        ));
    }
    let (_l, c) = client(url, PgMode::Advisory).await?;
    let g = c
        .acquire(&key)
        .await
        .map_err(|e| format!("acquire after the crash: {e}"))?;
    let next = g.token().get();
    let info = c.inspect(&key).await.map_err(e2s)?;
    g.release().await.map_err(e2s)?;
    // The crash guard moves the sequence 2^32 ahead before the first draw after recovery.
    if next <= last + (1 << 31) {
        return Err(format!(
            "token {last} before the crash, {next} after (not moved 2^32 ahead)"
        ));
    }
    match info {
        Some(i) if i.token.get() == next && i.meta.pid.is_some() => {}
        other => return Err(format!("inspect after the crash: {other:?}")),
    }
    Ok(format!(
        "{before} holder rows before the crash, none after recovery; token {last} -> {next}"
    ))
}

/// The uncontended advisory grant writes no row, in both scopes: 64 grants and releases on
/// one client take a handful of transaction ids (the holder's metadata, recorded once per
/// connection, and the sequence's WAL record every 32 draws), not one per grant. Read from
/// the snapshot's xmax, the next id to be assigned, which reading does not assign.
async fn grants_without_xid(url: &str) -> Res<String> {
    let admin = admin(url).await?;
    let next_xid = || async {
        let x: String = admin
            .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
            .await
            .map_err(e2s)?
            .get(0);
        x.parse::<u64>().map_err(e2s)
    };
    let mut lines = Vec::new();
    for mode in [PgMode::Advisory, PgMode::Xact] {
        let (_l, c) = client(url, mode).await?;
        let key = format!("no-xid-{}", rand::random::<u32>());
        // The first cycle records the connection's metadata.
        cycle(&c, &key).await?;
        let before = next_xid().await?;
        let mut tokens = Vec::new();
        for _ in 0..64 {
            let g = c.acquire(&key).await.map_err(e2s)?;
            tokens.push(g.token().get());
            g.release().await.map_err(e2s)?;
        }
        let used = next_xid().await? - before;
        if tokens.windows(2).any(|w| w[1] <= w[0]) {
            return Err(format!("{mode:?}: tokens not increasing: {tokens:?}"));
        }
        // Two or three sequence records; the rest is slack for the server's own work.
        if used > 16 {
            return Err(format!(
                "{mode:?}: 64 grants took {used} transaction ids (a write per grant?)"
            ));
        }
        lines.push(format!(
            "{mode:?}: 64 grants and releases took {used} transaction ids"
        ));
    }
    Ok(lines.join("; "))
}

async fn terminate(url: &str, mode: PgMode) -> Res<String> {
    let (_l1, a) = client(url, mode).await?;
    let (_l2, b) = client(url, mode).await?;
    let key = format!("terminate-{}", rand::random::<u32>());
    let g = a.acquire(&key).await.map_err(e2s)?;
    let before = g.token();
    let (held, _) = advisory_state(url, &key).await?;
    if held != 1 {
        return Err(format!(
            "{held} advisory locks granted on the key, expected 1"
        ));
    }
    let (hi, lo) = lock_parts(&key);
    let t = Instant::now();
    let killed: i64 = admin(url)
        .await?
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' \
             AND granted AND objsubid = 1 AND classid::bigint = $1 AND objid::bigint = $2",
            &[&hi, &lo],
        )
        .await
        .map_err(e2s)?
        .get(0);
    if killed != 1 {
        return Err(format!("terminated {killed} backends"));
    }
    let reason = tokio::time::timeout(Duration::from_secs(10), g.lost())
        .await
        .map_err(|_| "the guard did not report loss within 10 s")?;
    let lost_after = t.elapsed();
    let g2 = b
        .acquire(&key)
        .await
        .map_err(|e| format!("acquire after: {e}"))?;
    let after = g2.token();
    g2.release().await.map_err(e2s)?;
    if after <= before {
        return Err(format!("token {before} -> {after}"));
    }
    Ok(format!(
        "Lost {} ms after pg_terminate_backend ({reason:?}); token {before} -> {after}",
        lost_after.as_millis()
    ))
}

async fn timeout_race(url: &str, mode: PgMode) -> Res<String> {
    const WAITERS: usize = 16;
    let key = format!("race-{}", rand::random::<u32>());
    let (_hl, holder) = client(url, mode).await?;
    let mut tasks = Vec::new();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for i in 0..WAITERS {
        let (locks, c) = client(url, mode).await?;
        let (key, stop) = (key.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let _keep = locks;
            let (mut granted, mut timeouts) = (0u32, 0u32);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let wait = Duration::from_millis(5 + (n * 7 + i as u64 * 13) % 60);
                let o = c.options().clone().wait(WaitPolicy::Timeout(wait));
                match c.acquire_with(&key, &o).await {
                    Ok(g) => {
                        granted += 1;
                        sleep(Duration::from_millis(2)).await;
                        g.release().await?;
                    }
                    Err(LockError::Timeout { .. }) => timeouts += 1,
                    Err(e) => return Err(e),
                }
            }
            Ok::<_, LockError>((granted, timeouts))
        }));
    }
    // The holder takes and gives the key back at irregular moments, so grants land near
    // the waiters' deadlines.
    for i in 0..40u64 {
        let g = holder.acquire(&key).await.map_err(e2s)?;
        sleep(Duration::from_millis(10 + (i * 17) % 50)).await;
        g.release().await.map_err(e2s)?;
        sleep(Duration::from_millis((i * 11) % 20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut granted, mut timeouts) = (0, 0);
    for t in tasks {
        let (g, to) = t.await.map_err(e2s)?.map_err(e2s)?;
        granted += g;
        timeouts += to;
    }
    // Nothing may be left held by a waiter that reported a timeout.
    sleep(Duration::from_millis(300)).await;
    let (held, waiting) = advisory_state(url, &key).await?;
    if held != 0 || waiting != 0 {
        return Err(format!(
            "{held} granted and {waiting} waiting advisory locks left on the key"
        ));
    }
    let g = holder
        .try_acquire(&key)
        .await
        .map_err(|e| format!("key not free after the run: {e}"))?;
    g.release().await.map_err(e2s)?;
    if timeouts == 0 {
        return Err("no waiter timed out: the race was not exercised".into());
    }
    Ok(format!(
        "{WAITERS} waiters: {granted} grants, {timeouts} timeouts, nothing left held"
    ))
}

async fn many_waiters(url: &str, mode: PgMode) -> Res<String> {
    const WAITERS: usize = 200;
    let (locks, c) = client(url, mode).await?;
    let key = format!("many-{}", rand::random::<u32>());
    let holder = c.acquire(&key).await.map_err(e2s)?;
    let mut tasks = Vec::new();
    for _ in 0..WAITERS {
        let (c, key) = (c.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let o = c
                .options()
                .clone()
                .wait(WaitPolicy::Timeout(Duration::from_secs(60)));
            let g = c.acquire_with(&key, &o).await?;
            let t = g.token();
            g.release().await?;
            Ok::<_, LockError>(t)
        }));
    }
    sleep(Duration::from_millis(500)).await;
    // Other keys still get connections while 200 tasks wait.
    let t = Instant::now();
    for i in 0..20 {
        let g = c
            .try_acquire(&format!("{key}-other-{i}"))
            .await
            .map_err(|e| format!("other key {i} while 200 wait: {e}"))?;
        g.release().await.map_err(e2s)?;
    }
    let others = t.elapsed();
    let pool = locks.pool().status();
    holder.release().await.map_err(e2s)?;
    let mut tokens = HashSet::new();
    for t in tasks {
        let tok = t.await.map_err(e2s)?.map_err(e2s)?;
        tokens.insert(tok);
    }
    if tokens.len() != WAITERS {
        return Err(format!(
            "{} distinct tokens for {WAITERS} grants",
            tokens.len()
        ));
    }
    Ok(format!(
        "20 other keys in {} ms while {WAITERS} waited; pool {} of {} connections open; \
         all {WAITERS} granted in turn",
        others.as_millis(),
        pool.size,
        pool.max_size
    ))
}

async fn setup_inventory(url: &str, table: &str, stock: i32) -> Res<tokio_postgres::Client> {
    let a = admin(url).await?;
    a.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; \
         CREATE TABLE {table} (item text PRIMARY KEY, stock int NOT NULL, \
             fence_token bigint NOT NULL DEFAULT 0); \
         INSERT INTO {table} (item, stock) VALUES ('item-1', {stock})"
    ))
    .await
    .map_err(e2s)?;
    Ok(a)
}

async fn fenced_inventory(url: &str) -> Res<String> {
    let a = setup_inventory(url, "inventory_fenced", 10).await?;
    let table = FencedTable::new("inventory_fenced", "fence_token").map_err(e2s)?;
    let (_l1, c1) = client(url, PgMode::Lease).await?;
    let (_l2, c2) = client(url, PgMode::Lease).await?;
    let key = format!("inv-{}", rand::random::<u32>());
    // A holder that stops renewing (a paused process) and comes back after its lease.
    let o = c1
        .options()
        .clone()
        .lease(Duration::from_millis(300))
        .auto_renew(false);
    let stale = c1.acquire_with(&key, &o).await.map_err(e2s)?;
    let t_stale = stale.token();
    let fresh = c2.acquire(&key).await.map_err(e2s)?;
    let t_fresh = fresh.token();
    let set = "stock = stock - 1";
    let filter = "item = $1 AND stock > 0";
    let w1 = fenced_update(&a, &table, set, filter, &[&"item-1"], t_fresh)
        .await
        .map_err(e2s)?;
    let w2 = fenced_update(&a, &table, set, filter, &[&"item-1"], t_stale)
        .await
        .map_err(e2s)?;
    let stock: i32 = a
        .query_one("SELECT stock FROM inventory_fenced", &[])
        .await
        .map_err(e2s)?
        .get(0);
    fresh.release().await.map_err(e2s)?;
    drop(stale);
    let _ = a.batch_execute("DROP TABLE inventory_fenced").await;
    if w1 != FencedWrite::Applied(1) || !matches!(w2, FencedWrite::Refused { .. }) || stock != 9 {
        return Err(format!("fresh {w1:?}, stale {w2:?}, stock {stock}"));
    }
    Ok(format!(
        "fresh token {t_fresh} applied, late token {t_stale} refused, stock 10 -> 9"
    ))
}

async fn in_transaction(url: &str) -> Res<String> {
    const BUYERS: usize = 40;
    let a = setup_inventory(url, "inventory_tx", 25).await?;
    let locks = PgLocks::connect_with(pg_config(url).pool_size(12))
        .await
        .map_err(e2s)?;
    let table = FencedTable::new("inventory_tx", "fence_token").map_err(e2s)?;
    let mut tasks = Vec::new();
    for _ in 0..BUYERS {
        let (locks, table) = (locks.clone(), table.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = locks.pool().get().await.map_err(e2s)?;
            let tx = conn.transaction().await.map_err(e2s)?;
            let token = locks
                .lock_in_transaction(
                    &tx,
                    "inventory:item-1",
                    WaitPolicy::Timeout(Duration::from_secs(30)),
                )
                .await
                .map_err(e2s)?;
            // Read-modify-write, as the seed's inventory service does.
            let stock: i32 = tx
                .query_one("SELECT stock FROM inventory_tx WHERE item = 'item-1'", &[])
                .await
                .map_err(e2s)?
                .get(0);
            tokio::task::yield_now().await;
            let sold = if stock > 0 {
                let w = fenced_update(
                    &*tx,
                    &table,
                    "stock = $2",
                    "item = $1",
                    &[&"item-1", &(stock - 1)],
                    token,
                )
                .await
                .map_err(e2s)?;
                w == FencedWrite::Applied(1)
            } else {
                false
            };
            tx.commit().await.map_err(e2s)?;
            Ok::<_, String>(sold)
        }));
    }
    let mut sold = 0;
    for t in tasks {
        if t.await.map_err(e2s)?? {
            sold += 1;
        }
    }
    let stock: i32 = a
        .query_one("SELECT stock FROM inventory_tx", &[])
        .await
        .map_err(e2s)?
        .get(0);
    let _ = a.batch_execute("DROP TABLE inventory_tx").await;
    if sold != 25 || stock != 0 {
        return Err(format!(
            "{sold} sold, {stock} left (expected 25 sold, 0 left)"
        ));
    }
    Ok(format!(
        "{BUYERS} buyers, 25 units: each sold once, none oversold"
    ))
}

async fn concurrent_migrate(url: &str) -> Res<String> {
    let schema = format!("race_{}", rand::random::<u32>());
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let cfg = pg_config(url).schema(schema.clone());
        tasks.push(tokio::spawn(
            async move { PgLocks::connect_with(cfg).await },
        ));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(
            t.await
                .map_err(e2s)?
                .map_err(|e| format!("first use: {e}"))?,
        );
    }
    let c = LockClient::new(clients[0].lease_rows());
    let g = c.acquire("k").await.map_err(e2s)?;
    g.release().await.map_err(e2s)?;
    let _ = admin(url)
        .await?
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await;
    Ok("8 clients created the schema at once without error".into())
}

/// The privileges lock-pg's README lists for a role that uses a schema another role
/// migrated are enough, with `EXECUTE` on the schema's functions revoked from PUBLIC (so
/// the explicit grant is the one that counts): every mode acquires (40 times, past a
/// session block's end), waits behind a holder, inspects and releases, and
/// `lock_in_transaction` takes its lock.
async fn least_privilege(url: &str) -> Res<String> {
    let a = admin(url).await?;
    let tag = rand::random::<u32>();
    let (schema, role) = (format!("app_{tag}"), format!("app_user_{tag}"));
    PgLocks::connect_with(pg_config(url).schema(schema.clone()))
        .await
        .map_err(e2s)?
        .migrate()
        .await
        .map_err(e2s)?;
    a.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN; \
         REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} FROM PUBLIC; \
         GRANT USAGE ON SCHEMA {schema} TO {role}; \
         GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA {schema} TO {role}; \
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {role}; \
         GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {role}"
    ))
    .await
    .map_err(e2s)?;
    let weak_url = url.replacen("postgres@", &format!("{role}@"), 1);
    let res = async {
        let locks = PgLocks::connect_with(
            pg_config(&weak_url)
                .schema(schema.clone())
                .auto_migrate(false),
        )
        .await
        .map_err(e2s)?;
        let mut lines = Vec::new();
        for mode in PgMode::ALL {
            let c = LockClient::from_arc(mode.backend(&locks)).with_options(opts());
            let mut last = 0;
            for i in 0..40 {
                let g = c.acquire("k").await.map_err(e2s)?;
                let t = g.token().get();
                if t <= last {
                    return Err(format!("{}: grant {i} token {t} after {last}", mode.name()));
                }
                last = t;
                g.release().await.map_err(e2s)?;
            }
            let held = c.acquire("w").await.map_err(e2s)?;
            let c2 = c.clone();
            let waiter = tokio::spawn(async move {
                let g = c2.acquire("w").await.map_err(e2s)?;
                let t = g.token().get();
                g.release().await.map_err(e2s)?;
                Ok::<_, String>(t)
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
            let seen = c.inspect("w").await.map_err(e2s)?.map(|i| i.token);
            if seen != Some(held.token()) {
                return Err(format!("{}: inspect saw {seen:?}", mode.name()));
            }
            let first = held.token().get();
            held.release().await.map_err(e2s)?;
            let next = waiter.await.map_err(e2s)??;
            if next <= first {
                return Err(format!(
                    "{}: waiter's token {next} after {first}",
                    mode.name()
                ));
            }
            lines.push(format!(
                "{} tokens up to {last}, waiter {first} -> {next}",
                mode.name()
            ));
        }
        let mut conn = locks.pool().get().await.map_err(e2s)?;
        let tx = conn.transaction().await.map_err(e2s)?;
        let t = locks
            .lock_in_transaction(&tx, "k", WaitPolicy::Timeout(Duration::from_secs(5)))
            .await
            .map_err(e2s)?;
        tx.commit().await.map_err(e2s)?;
        lines.push(format!("lock_in_transaction token {}", t.get()));
        Ok(lines.join("; "))
    }
    .await;
    // The role's connections are gone with its pool; then its privileges and the role.
    let _ = a
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE; DROP ROLE {role}"))
        .await;
    res
}

async fn bad_config(url: &str) -> Res<String> {
    let a = admin(url).await?;
    let mut seen = Vec::new();
    // A schema name that would inject SQL is refused before anything is sent.
    match PgLocks::connect_with(PgConfig::new(url).schema("x; DROP TABLE y")).await {
        Err(LockError::InvalidConfig(m)) => seen.push(m),
        other => return Err(format!("bad schema: {other:?}")),
    }
    match PgLocks::connect("postgres://127.0.0.1:notaport/db").await {
        Err(LockError::InvalidConfig(m)) => seen.push(m),
        other => return Err(format!("bad URL: {other:?}")),
    }
    // Nothing listens on this port: a retryable error, within the operation timeout.
    let t = Instant::now();
    let dead = PgConfig::new("postgres://postgres@127.0.0.1:9/postgres")
        .op_timeout(Duration::from_secs(1));
    match PgLocks::connect_with(dead).await {
        Err(e) if e.is_retryable() && t.elapsed() < Duration::from_secs(3) => {
            seen.push(e.to_string())
        }
        other => return Err(format!("dead server: {other:?} after {:?}", t.elapsed())),
    }
    // A missing schema without auto-migration: refused at connect.
    let missing = format!("missing_{}", rand::random::<u32>());
    match PgLocks::connect_with(pg_config(url).schema(missing.clone()).auto_migrate(false)).await {
        Err(LockError::InvalidConfig(m)) if m.contains("migrate") => seen.push(m),
        other => return Err(format!("missing schema: {other:?}")),
    }
    // A role that may not create the schema.
    let role = format!("weak_{}", rand::random::<u32>());
    a.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN; REVOKE CREATE ON DATABASE postgres FROM PUBLIC"
    ))
    .await
    .map_err(e2s)?;
    let weak_url = url.replacen("postgres@", &format!("{role}@"), 1);
    let res = PgLocks::connect_with(pg_config(&weak_url).schema(format!("s_{role}"))).await;
    let _ = a.batch_execute(&format!("DROP ROLE {role}")).await;
    match res {
        Err(LockError::InvalidConfig(m)) if m.contains("permission") => seen.push(m),
        other => return Err(format!("no CREATE permission: {other:?}")),
    }
    let schemas: i64 = a
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'missing_%' OR nspname LIKE 's_weak_%' OR nspname LIKE 'x%'",
            &[],
        )
        .await
        .map_err(e2s)?
        .get(0);
    if schemas != 0 {
        return Err(format!(
            "{schemas} schemas written by refused configurations"
        ));
    }
    Ok(seen.join(" | "))
}

async fn restart(url: &str, server: &mut Postgres) -> Res<String> {
    let mut lines = Vec::new();
    for mode in PgMode::ALL {
        let (_l, c) = client(url, mode).await?;
        let key = format!("restart-{}", rand::random::<u32>());
        let g = c.acquire(&key).await.map_err(e2s)?;
        let before = g.token();
        let restarted = tokio::task::block_in_place(|| server.restart());
        restarted?;
        let lost = if mode == PgMode::Lease {
            // The row survives a restart: the lease is still valid and renewals resume.
            sleep(Duration::from_secs(3)).await;
            match g.status() {
                LockStatus::Held => {
                    "held through the restart (the lease row is durable)".to_owned()
                }
                s => return Err(format!("lease guard {s:?} after the restart")),
            }
        } else {
            let r = tokio::time::timeout(Duration::from_secs(10), g.lost())
                .await
                .map_err(|_| format!("{}: no loss reported after the restart", mode.name()))?;
            format!("lost ({r:?})")
        };
        drop(g);
        let g2 = c
            .acquire(&key)
            .await
            .map_err(|e| format!("acquire after restart: {e}"))?;
        let after = g2.token();
        g2.release().await.map_err(e2s)?;
        if after <= before {
            return Err(format!("{}: token {before} -> {after}", mode.name()));
        }
        lines.push(format!(
            "{}: {lost}, token {before} -> {after}",
            mode.name()
        ));
    }
    Ok(lines.join("; "))
}

/// A lease row whose token is ahead of the token sequence (a row written by hand, or a
/// sequence set back): the next grant is still above the row's token, and the row (what
/// `inspect` shows) carries the token actually issued. (The advisory modes keep no
/// per-key counter: their tokens are draws of the sequence, which must never be set
/// back; see the README's "Restoring from a backup".)
async fn counter_ahead(url: &str) -> Res<String> {
    let admin = admin(url).await?;
    let (_locks, c) = client(url, PgMode::Lease).await?;
    let key = "ahead-lease";
    // Make sure the schema and the key's row exist, then push the row's token far ahead.
    cycle(&c, key).await?;
    let ahead: i64 = 1 << 50;
    let n = admin
        .execute(
            "UPDATE distlock.lease SET token = $2 WHERE key = $1",
            &[&key, &ahead],
        )
        .await
        .map_err(e2s)?;
    if n != 1 {
        return Err(format!("no lease row for {key}"));
    }
    let g = c.acquire(key).await.map_err(e2s)?;
    let token = g.token().get();
    if token <= ahead as u64 {
        return Err(format!("token {token} not above the row's {ahead}"));
    }
    let info = c
        .inspect(key)
        .await
        .map_err(e2s)?
        .ok_or("inspect found no holder")?;
    if info.token != g.token() {
        return Err(format!(
            "the lease row shows token {} but the holder got {token}",
            info.token
        ));
    }
    g.release().await.map_err(e2s)?;
    Ok(format!("row at 2^50; next token {token}"))
}

/// An advisory holder is named in `application_name` (`lk <lease> <token>`) from the moment
/// its grant returns, and a released connection has its own name back before it is used
/// again: the grant and release return as soon as their row arrives, ahead of the rest of
/// the server's answer, so this checks that nothing they leave behind is seen late.
async fn holder_name(url: &str) -> Res<String> {
    let admin = admin(url).await?;
    let mut seen = Vec::new();
    for mode in [PgMode::Advisory, PgMode::Xact] {
        // Two connections (the least a pool may have); both are checked after the release.
        let locks = PgLocks::connect_with(pg_config(url).pool_size(2))
            .await
            .map_err(e2s)?;
        let c = LockClient::from_arc(mode.backend(&locks)).with_options(opts());
        let key = format!("name-{mode:?}-{}", rand::random::<u32>());
        let (hi, lo) = lock_parts(&key);
        for round in 0..3 {
            let g = c.acquire(&key).await.map_err(e2s)?;
            let want = format!("lk {} {}", g.lease_id(), g.token());
            let row = admin
                .query_one(
                    "SELECT a.application_name FROM pg_locks l \
                     JOIN pg_stat_activity a ON a.pid = l.pid \
                     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
                       AND l.classid::bigint = $1 AND l.objid::bigint = $2",
                    &[&hi, &lo],
                )
                .await
                .map_err(e2s)?;
            let name: String = row.get(0);
            if name != want {
                return Err(format!(
                    "{mode:?} round {round}: the holder is named {name:?}, not {want:?}"
                ));
            }
            let info = c
                .inspect(&key)
                .await
                .map_err(e2s)?
                .ok_or_else(|| format!("{mode:?}: inspect found no holder"))?;
            if info.lease_id != *g.lease_id() || info.token != g.token() {
                return Err(format!(
                    "{mode:?}: inspect shows {} {}, the holder is {} {}",
                    info.lease_id,
                    info.token,
                    g.lease_id(),
                    g.token()
                ));
            }
            g.release().await.map_err(e2s)?;
            let conns = [
                locks.pool().get().await.map_err(e2s)?,
                locks.pool().get().await.map_err(e2s)?,
            ];
            for conn in &conns {
                let row = conn
                    .query_one(
                        "SELECT current_setting('application_name'), \
                                current_setting('idle_session_timeout')",
                        &[],
                    )
                    .await
                    .map_err(e2s)?;
                let (name, idle): (String, String) = (row.get(0), row.get(1));
                if name != "lock-pg" || idle != "0" {
                    return Err(format!(
                        "{mode:?} round {round}: a pooled connection after the release is \
                         named {name:?} with idle_session_timeout {idle}"
                    ));
                }
            }
        }
        seen.push(format!("{mode:?}"));
    }
    Ok(format!(
        "{}: named at the grant, own name back after the release",
        seen.join(", ")
    ))
}

/// Right after a crash (the crash guard's marker gone), a transaction-scoped lock taken in
/// the caller's REPEATABLE READ transaction whose snapshot is older than the guard's
/// commit: the snapshot cannot see the marker back, so the grant is refused with a
/// retryable error (nothing taken, nothing waited for); the same lock in a new transaction
/// is granted, above every earlier token.
async fn guard_in_old_snapshot(url: &str) -> Res<String> {
    let admin = admin(url).await?;
    let key = format!("rr-guard-{}", rand::random::<u32>());
    let (_l, c) = client(url, PgMode::Advisory).await?;
    let g = c.acquire(&key).await.map_err(e2s)?;
    let before = g.token().get();
    g.release().await.map_err(e2s)?;
    let old = PgLocks::connect_with(pg_config(url).pool_size(2))
        .await
        .map_err(e2s)?;
    // What crash recovery does to the unlogged marker.
    admin
        .batch_execute("TRUNCATE distlock.epoch")
        .await
        .map_err(e2s)?;
    let mut conn = old.pool().get().await.map_err(e2s)?;
    let tx = conn
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .map_err(e2s)?;
    // The transaction's snapshot, taken now: no marker.
    let seen: i64 = tx
        .query_one("SELECT count(*) FROM distlock.epoch", &[])
        .await
        .map_err(e2s)?
        .get(0);
    if seen != 0 {
        return Err(format!("{seen} markers right after the truncate"));
    }
    // Another client's first use runs the guard: the marker is back, the sequence moved.
    let (_l2, other) = client(url, PgMode::Advisory).await?;
    let g = other.acquire(&format!("{key}-other")).await.map_err(e2s)?;
    let moved = g.token().get();
    g.release().await.map_err(e2s)?;
    match old.lock_in_transaction(&tx, &key, WaitPolicy::NoWait).await {
        Err(e) if e.is_retryable() => {}
        other => {
            return Err(format!(
                "a lock in a snapshot older than the crash guard: {other:?}"
            ))
        }
    }
    tx.rollback().await.map_err(e2s)?;
    let tx = conn.transaction().await.map_err(e2s)?;
    let t = old
        .lock_in_transaction(&tx, &key, WaitPolicy::NoWait)
        .await
        .map_err(|e| format!("the retry in a new transaction: {e}"))?
        .get();
    tx.commit().await.map_err(e2s)?;
    if moved <= before + (1 << 31) || t <= moved {
        return Err(format!(
            "tokens did not grow across the guard: {before} before, {moved} and {t} after"
        ));
    }
    Ok(format!(
        "token {before} before the marker went; the old snapshot refused (retryable); \
         {moved} and {t} after the guard"
    ))
}

/// The lease release commits without waiting for a WAL flush (`synchronous_commit` off for
/// its own transaction). The setting must not outlive that transaction: the connection goes
/// back to the pool, and a grant or renewal on it must commit synchronously.
async fn async_release(url: &str) -> Res<String> {
    // Two connections (the least a pool may have); both are checked after the release.
    let locks = PgLocks::connect_with(pg_config(url).pool_size(2))
        .await
        .map_err(e2s)?;
    let c = LockClient::new(locks.lease_rows()).with_options(opts());
    let key = "async-release";
    let first = c.acquire(key).await.map_err(e2s)?;
    let t1 = first.token();
    let outcome = first.release().await.map_err(e2s)?;
    if outcome != lock_core::ReleaseOutcome::Released {
        return Err(format!("release answered {outcome:?}"));
    }
    let conns = [
        locks.pool().get().await.map_err(e2s)?,
        locks.pool().get().await.map_err(e2s)?,
    ];
    let mut session_value = String::new();
    for conn in &conns {
        let row = conn
            .query_one(
                "SELECT current_setting('synchronous_commit'), \
                        (SELECT reset_val FROM pg_settings WHERE name = 'synchronous_commit')",
                &[],
            )
            .await
            .map_err(e2s)?;
        let (now, reset): (String, String) = (row.get(0), row.get(1));
        if now != reset {
            return Err(format!(
                "synchronous_commit is {now} on the pooled connection after a release \
                 (the server's own value is {reset})"
            ));
        }
        session_value = now;
    }
    drop(conns);
    // The released row is free at once, and the next grant's token is higher.
    let second = c.try_acquire(key).await.map_err(e2s)?;
    let t2 = second.token();
    second.release().await.map_err(e2s)?;
    if t2 <= t1 {
        return Err(format!("token went from {t1} to {t2}"));
    }
    Ok(format!(
        "released, the pooled connection's synchronous_commit is back to {session_value}, \
         next token {t1} -> {t2}"
    ))
}

/// Listens on the lease mode's release channel; yields each notification's payload (key).
async fn release_notes(
    url: &str,
) -> Res<(
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
)> {
    use futures::StreamExt;
    let (c, mut conn) = tokio_postgres::connect(url, NoTls).await.map_err(e2s)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut stream = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(m)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                if tx.send(n.payload().to_owned()).is_err() {
                    break;
                }
            }
        }
    });
    c.batch_execute("LISTEN distlock_released")
        .await
        .map_err(e2s)?;
    Ok((c, rx))
}

/// Whether a release notification for `key` arrives within `within`.
async fn noted(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    key: &str,
    within: Duration,
) -> bool {
    let end = Instant::now() + within;
    while let Ok(Some(k)) = tokio::time::timeout_at(end, rx.recv()).await {
        if k == key {
            return true;
        }
    }
    false
}

/// A release in the process that has a waiter for the key hands the row straight to it:
/// the row never goes free (no release notification), the waiter holds it with a higher
/// token, and a release with no waiter still goes through the server.
async fn direct_handoff(url: &str) -> Res<String> {
    let locks = PgLocks::connect_with(pg_config(url)).await.map_err(e2s)?;
    let c = LockClient::new(locks.lease_rows()).with_options(opts());
    let key = format!("direct-handoff-{}", rand::random::<u32>());
    let (_listener, mut notes) = release_notes(url).await?;
    let first = c.acquire(&key).await.map_err(e2s)?;
    let t1 = first.token();
    let waiter = {
        let (c, key) = (c.clone(), key.clone());
        tokio::spawn(async move { c.acquire(&key).await })
    };
    // Let the waiter find the row held and wait.
    sleep(Duration::from_millis(300)).await;
    if waiter.is_finished() {
        return Err("the waiter did not wait for the held lock".into());
    }
    let outcome = first.release().await.map_err(e2s)?;
    if outcome != lock_core::ReleaseOutcome::Released {
        return Err(format!("release answered {outcome:?}"));
    }
    let second = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .map_err(|_| "the waiter was not granted within 10 s of the release".to_owned())?
        .map_err(e2s)?
        .map_err(e2s)?;
    let t2 = second.token();
    if t2 <= t1 {
        return Err(format!("token went from {t1} to {t2}"));
    }
    let info = c.inspect(&key).await.map_err(e2s)?;
    if info.as_ref().map(|i| &i.lease_id) != Some(second.lease_id()) {
        return Err(format!("inspect shows {info:?}, not the waiter's lease"));
    }
    if noted(&mut notes, &key, Duration::from_millis(300)).await {
        return Err("the row went free (a release notification) before the waiter's grant".into());
    }
    // The waiter found the row held before it waited, and the hand-off keeps that mark
    // (it cannot tell this process's waiters from others'): the next release notifies.
    second.release().await.map_err(e2s)?;
    if !noted(&mut notes, &key, Duration::from_secs(5)).await {
        return Err("the release after the hand-off sent no notification".into());
    }
    Ok(format!(
        "the row went from holder to waiter in one statement (no notification), token {t1} -> {t2}"
    ))
}

/// Four tasks of one process take a key in turn without pause, so nearly every release
/// finds a local waiter and hands the row over directly; each holder checks that it is
/// alone and that its token is the highest yet. A waiter in another process must still get
/// the key within a bounded number of the busy process's cycles (direct hand-offs are
/// bounded, and the release after a streak does not favour the local waiter).
async fn other_process_turn(url: &str) -> Res<String> {
    let (_la, busy) = client(url, PgMode::Lease).await?;
    let (_lb, other) = client(url, PgMode::Lease).await?;
    let key = format!("other-turn-{}", rand::random::<u32>());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cycles = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Every holder, here and in the other process, checks that it is alone and that its
    // token is above the previous holder's (the hand-offs must keep both).
    let held = Arc::new(Holding::default());
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (c, key, stop, cycles, held) = (
            busy.clone(),
            key.clone(),
            stop.clone(),
            cycles.clone(),
            held.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let g = c.acquire(&key).await.map_err(e2s)?;
                held.enter(g.token().get())?;
                sleep(Duration::from_millis(2)).await;
                held.leave();
                g.release().await.map_err(e2s)?;
                cycles.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok::<_, String>(())
        }));
    }
    sleep(Duration::from_millis(300)).await;
    let before = cycles.load(std::sync::atomic::Ordering::Relaxed);
    let got = other
        .with_options(opts().wait(WaitPolicy::Timeout(Duration::from_secs(15))))
        .acquire(&key)
        .await;
    let during = cycles.load(std::sync::atomic::Ordering::Relaxed) - before;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let g = got.map_err(|e| {
        format!("the other process's waiter did not get the key ({e}) while the busy one cycled {during} times")
    })?;
    held.enter(g.token().get())?;
    held.leave();
    g.release().await.map_err(e2s)?;
    for t in tasks {
        t.await.map_err(e2s)??;
    }
    if before < 8 {
        return Err(format!(
            "the busy process cycled only {before} times: no contention"
        ));
    }
    // A count, not a time: with direct hand-offs bounded to 4 in a row, every fifth release
    // is a race the other process can win (it took 10 to 121 cycles here). Unbounded, it
    // took 3474 and 3918 cycles: the other process only won in the gaps between a waiter's
    // refusal and its offer.
    if during > 1000 {
        return Err(format!(
            "the busy process cycled {during} times before the other process got the key"
        ));
    }
    Ok(format!(
        "the other process got the key after {during} cycles of the busy one ({before} before it asked)"
    ))
}

/// A lease release notifies only when an acquire found the row held since its last
/// grant: not for a key nobody waited for, and at once for a waiter in another client.
async fn notify_when_waited(url: &str) -> Res<String> {
    let (_la, c) = client(url, PgMode::Lease).await?;
    let (_lb, other) = client(url, PgMode::Lease).await?;
    let key = format!("notify-when-waited-{}", rand::random::<u32>());
    let (_listener, mut notes) = release_notes(url).await?;
    cycle(&c, &key).await?;
    if noted(&mut notes, &key, Duration::from_millis(300)).await {
        return Err("a release nobody waited for sent a notification".into());
    }
    let first = c.acquire(&key).await.map_err(e2s)?;
    let waiter = {
        let key = key.clone();
        tokio::spawn(async move { other.acquire(&key).await })
    };
    sleep(Duration::from_millis(300)).await;
    if waiter.is_finished() {
        return Err("the other client's waiter did not wait for the held lock".into());
    }
    first.release().await.map_err(e2s)?;
    if !noted(&mut notes, &key, Duration::from_secs(5)).await {
        return Err("a release with a waiter in another client sent no notification".into());
    }
    let second = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .map_err(|_| "the other client's waiter was not granted within 10 s".to_owned())?
        .map_err(e2s)?
        .map_err(e2s)?;
    // Its grant cleared the mark: its own release has nobody to wake.
    second.release().await.map_err(e2s)?;
    if noted(&mut notes, &key, Duration::from_millis(300)).await {
        return Err("the waiter's own release, with nobody waiting, sent a notification".into());
    }
    Ok("no notification without a waiter; one for the other client's waiter".into())
}

/// The holders of one key, checked as they come: one at a time, tokens rising.
#[derive(Default)]
struct Holding {
    inside: std::sync::atomic::AtomicBool,
    last: std::sync::Mutex<u64>,
}

impl Holding {
    fn enter(&self, token: u64) -> Res<()> {
        if self.inside.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(format!(
                "token {token} granted while another holder was inside"
            ));
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if token <= *last {
            return Err(format!("token {token} granted after token {}", *last));
        }
        *last = token;
        Ok(())
    }

    fn leave(&self) {
        self.inside
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// An acquire attempt whose lease id already holds the row (its earlier answer was lost)
/// is granted again with a higher token, rather than locked out until its own expiry.
async fn same_lease_again(url: &str) -> Res<String> {
    use lock_core::{AcquireRequest, Backoff, HolderMeta, LockBackend, LockKey};
    let locks = PgLocks::connect_with(pg_config(url)).await.map_err(e2s)?;
    let b = locks.lease_rows();
    let key = LockKey::new(format!("same-lease-{}", rand::random::<u32>())).map_err(e2s)?;
    let req = AcquireRequest::new(
        key.clone(),
        Duration::from_secs(5),
        HolderMeta::default(),
        Backoff::default(),
    );
    let t1 = b.try_acquire(&req).await.map_err(e2s)?.token;
    let t2 = b.try_acquire(&req).await.map_err(e2s)?.token;
    if t2 <= t1 {
        return Err(format!("token went from {t1} to {t2}"));
    }
    // Another lease id is still refused.
    let other = AcquireRequest::new(
        key.clone(),
        Duration::from_secs(5),
        HolderMeta::default(),
        Backoff::default(),
    );
    match b.try_acquire(&other).await {
        Err(LockError::Contended { .. }) => {}
        r => return Err(format!("another lease id got {r:?} while the row was held")),
    }
    b.release(&req.lease()).await.map_err(e2s)?;
    Ok(format!(
        "granted again under the same lease id, token {t1} -> {t2}"
    ))
}

/// A schema of another version is refused at first use, with both versions named, and
/// left as it was.
async fn other_schema_version(url: &str) -> Res<String> {
    let schema = format!("versioned_{}", rand::random::<u32>());
    let cfg = || pg_config(url).schema(schema.clone());
    drop(PgLocks::connect_with(cfg()).await.map_err(e2s)?);
    let admin = admin(url).await?;
    admin
        .batch_execute(&format!("UPDATE {schema}.schema_version SET version = 99"))
        .await
        .map_err(e2s)?;
    let res = PgLocks::connect_with(cfg()).await;
    let res2 = PgLocks::connect_with(cfg().auto_migrate(false)).await;
    let left: i32 = admin
        .query_one(&format!("SELECT version FROM {schema}.schema_version"), &[])
        .await
        .map_err(e2s)?
        .get(0);
    admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .map_err(e2s)?;
    for r in [res.map(drop), res2.map(drop)] {
        match r {
            Err(LockError::InvalidConfig(m)) if m.contains("99") => {}
            other => return Err(format!("a version-99 schema gave {other:?}")),
        }
    }
    if left != 99 {
        return Err(format!("the schema's version was changed to {left}"));
    }
    Ok("refused, naming version 99; left untouched".into())
}

/// The relations and functions in `schema`, by name and kind.
async fn schema_objects(admin: &tokio_postgres::Client, schema: &str) -> Res<Vec<String>> {
    let rows = admin
        .query(
            "WITH n AS (SELECT oid FROM pg_namespace WHERE nspname = $1) \
             SELECT relname || ' ' || relkind::text FROM pg_class, n WHERE relnamespace = n.oid \
             UNION ALL SELECT proname::text || ' f' FROM pg_proc, n WHERE pronamespace = n.oid \
             ORDER BY 1",
            &[&schema],
        )
        .await
        .map_err(e2s)?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A schema that holds the application's own tables is refused with an error that names
/// it, and nothing is created in it: one with a migration tool's `schema_version` table
/// (a text version), one with a `lease` table and no `schema_version`, with and without
/// auto_migrate. An empty schema made beforehand (by an administrator) is taken.
async fn foreign_schema(url: &str) -> Res<String> {
    use lock_core::LockBackend as _;
    let admin = admin(url).await?;
    let n = rand::random::<u32>();
    let (tool, own, empty) = (
        format!("tool_{n}"),
        format!("own_{n}"),
        format!("empty_{n}"),
    );
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA {tool}; \
             CREATE TABLE {tool}.schema_version (installed_rank int PRIMARY KEY, version varchar(50)); \
             INSERT INTO {tool}.schema_version VALUES (1, '1.0.3'); \
             CREATE SCHEMA {own}; \
             CREATE TABLE {own}.lease (id serial PRIMARY KEY, tenant text); \
             CREATE SCHEMA {empty};"
        ))
        .await
        .map_err(e2s)?;
    let mut seen = Vec::new();
    let mut failures = Vec::new();
    for (schema, auto) in [(&tool, true), (&tool, false), (&own, true), (&own, false)] {
        let before = schema_objects(&admin, schema).await?;
        let cfg = pg_config(url).schema(schema.clone()).auto_migrate(auto);
        // In a task of its own: a panic is reported as one.
        let res = tokio::spawn(async move {
            let locks = PgLocks::connect_with(cfg).await?;
            locks
                .lease_rows()
                .inspect(&lock_core::LockKey::new("k")?)
                .await
                .map(drop)
        })
        .await;
        let after = schema_objects(&admin, schema).await?;
        match res {
            Ok(Err(LockError::InvalidConfig(m)))
                if m.contains(schema.as_str()) && m.contains("not a lock schema") =>
            {
                seen.push(m)
            }
            other => failures.push(format!(
                "{schema} (auto_migrate {auto}) gave {other:?}, not an error naming it as \
                 not a lock schema"
            )),
        }
        if after != before {
            failures.push(format!("{schema} changed: {before:?} -> {after:?}"));
        }
    }
    let taken = PgLocks::connect_with(pg_config(url).schema(empty.clone())).await;
    admin
        .batch_execute(&format!(
            "DROP SCHEMA {tool} CASCADE; DROP SCHEMA {own} CASCADE; DROP SCHEMA {empty} CASCADE"
        ))
        .await
        .map_err(e2s)?;
    if let Err(e) = taken {
        failures.push(format!("the empty schema was refused: {e}"));
    }
    if !failures.is_empty() {
        return Err(failures.join("; "));
    }
    Ok(format!("refused, untouched: {}", seen.join(" | ")))
}
