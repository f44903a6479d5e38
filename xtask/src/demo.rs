//! `cargo xtask demo`: the seed's inventory scenario, end to end, on every backend that can
//! be provisioned here (the in-memory backend always).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lock_conformance::Target;
use lock_core::{Fenced, FencedWrite, LockClient, LockError, LockOptions, WaitPolicy};
use lock_tests::servers::{Postgres, Redis, ZooKeeper};
use lock_tests::targets;
use tokio::time::{sleep, Instant};

const UNITS: u32 = 100;
const WORKERS: usize = 8;

#[derive(Clone, Debug, Default)]
struct Inventory {
    stock: u32,
    sold: Vec<u32>,
}

struct Row {
    backend: String,
    sold: usize,
    unique: bool,
    min_stock: u32,
    late_write: String,
    recovery: String,
    ok: bool,
}

fn opts() -> LockOptions {
    LockOptions::default()
        .lease(Duration::from_secs(5))
        .wait(WaitPolicy::Timeout(Duration::from_secs(30)))
        .label("inventory demo")
}

pub(crate) async fn run() -> bool {
    let mut rows = Vec::new();
    let mut rows_ok = true;
    println!("Inventory demo: {UNITS} units, {WORKERS} concurrent buyers, one unit each, under the lock.\n");
    rows.push(scenario(targets::memory()).await);
    // Every backend whose server can be started here; each is stopped (by pid) after.
    match tokio::task::spawn_blocking(|| Redis::start(false)).await {
        Ok(Ok(server)) => {
            match targets::redis("redis", server.url(), true) {
                Ok(t) => rows.push(scenario(t).await),
                Err(e) => println!("redis: {e}"),
            }
            if !two_shells_race(&server.url()).await {
                rows_ok = false;
            }
            drop(server);
        }
        Ok(Err(e)) => println!("redis: not provisioned ({e}); skipping it"),
        Err(e) => println!("redis: {e}"),
    }
    match tokio::task::spawn_blocking(|| {
        (0..5)
            .map(|_| Redis::start(false))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    {
        Ok(Ok(servers)) => {
            match targets::redlock(servers.iter().map(Redis::url).collect()) {
                Ok(t) => rows.push(scenario(t).await),
                Err(e) => println!("redlock: {e}"),
            }
            drop(servers);
        }
        Ok(Err(e)) => println!("redlock: not provisioned ({e}); skipping it"),
        Err(e) => println!("redlock: {e}"),
    }
    match tokio::task::spawn_blocking(Postgres::start).await {
        Ok(Ok(server)) => {
            for mode in [targets::PgMode::Lease, targets::PgMode::Advisory] {
                match targets::pg(mode, server.url()) {
                    Ok(t) => rows.push(scenario(t).await),
                    Err(e) => println!("{}: {e}", mode.name()),
                }
            }
            drop(server);
        }
        Ok(Err(e)) => println!("pg: not provisioned ({e}); skipping it"),
        Err(e) => println!("pg: {e}"),
    }
    match tokio::task::spawn_blocking(|| ZooKeeper::start(1)).await {
        Ok(Ok(server)) => {
            match targets::zk("zk", server.connect_string()) {
                Ok(t) => rows.push(scenario(t).await),
                Err(e) => println!("zk: {e}"),
            }
            drop(server);
        }
        Ok(Err(e)) => println!("zk: not provisioned ({e}); skipping it"),
        Err(e) => println!("zk: {e}"),
    }
    match tokio::task::spawn_blocking(lock_tests::servers::Moto::start).await {
        Ok(Ok(moto)) => {
            match targets::dynamo(moto.url(), "dynamo (moto)") {
                Ok(t) => rows.push(scenario(t).await),
                Err(e) => println!("dynamo: {e}"),
            }
            drop(moto);
        }
        Ok(Err(e)) => println!("dynamo: the emulator (moto) did not start ({e}); skipping it"),
        Err(e) => println!("dynamo: {e}"),
    }
    println!("mongo: not provisioned (no MongoDB server can be obtained on this machine; set LOCK_MONGO_URL elsewhere)");
    println!("\n| backend | units sold | each unit once | lowest stock | paused holder's late write | killed holder's lock free after |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.backend, r.sold, r.unique, r.min_stock, r.late_write, r.recovery
        );
    }
    let ok = rows_ok && rows.iter().all(|r| r.ok);
    println!(
        "\ndemo: {}",
        if ok {
            "every invariant held"
        } else {
            "SOMETHING WENT WRONG"
        }
    );
    ok
}

/// Two shells start the same nightly job at once through `distlock --no-wait`: one runs it
/// (with its fencing token), the other is told the job is busy (exit 75).
async fn two_shells_race(url: &str) -> bool {
    println!("=== distlock: two shells race for one job");
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("distlock")));
    let Some(exe) = exe.filter(|e| e.exists()) else {
        println!("  distlock is not built (cargo build -p distlock)");
        return false;
    };
    let shell = |n: u32| {
        tokio::process::Command::new(&exe)
            .args([
                "run",
                "--store",
                url,
                "--no-wait",
                "nightly-report",
                "--",
                "sh",
                "-c",
            ])
            .arg(format!(
                "echo \"  shell {n}: running the report with token $DISTLOCK_TOKEN\"; sleep 1"
            ))
            .kill_on_drop(true)
            .status()
    };
    let (a, b) = tokio::join!(shell(1), shell(2));
    let codes = [a.ok().and_then(|s| s.code()), b.ok().and_then(|s| s.code())];
    for (n, c) in codes.iter().enumerate() {
        let what = match c {
            Some(0) => "ran the job".to_owned(),
            Some(75) => "busy: another host has the job (exit 75)".to_owned(),
            other => format!("exited {other:?}"),
        };
        println!("  shell {}: {what}", n + 1);
    }
    let mut sorted = codes;
    sorted.sort();
    sorted == [Some(0), Some(75)]
}

async fn client(t: &Target) -> Result<LockClient, LockError> {
    Ok(LockClient::from_arc((t.connect)().await?).with_options(opts()))
}

async fn scenario(t: Target) -> Row {
    let name = t.name.clone();
    println!("=== {name}");
    match try_scenario(t).await {
        Ok(row) => row,
        Err(e) => {
            println!("{name}: failed: {e}");
            Row {
                backend: name,
                sold: 0,
                unique: false,
                min_stock: 0,
                late_write: "-".into(),
                recovery: "-".into(),
                ok: false,
            }
        }
    }
}

async fn try_scenario(t: Target) -> Result<Row, LockError> {
    let key = format!("{}inventory:item-1", t.prefix);
    let inventory = Arc::new(Fenced::new(Inventory {
        stock: UNITS,
        sold: Vec::new(),
    }));
    let min_stock = Arc::new(Mutex::new(UNITS));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let c = client(&t).await?;
        let (key, inventory, min_stock) = (key.clone(), inventory.clone(), min_stock.clone());
        workers.push(tokio::spawn(async move {
            let mut bought = 0;
            loop {
                let g = c.acquire(&key).await?;
                // The read carries the token too, so an older holder still running
                // cannot slip a write between this read and the write below.
                let Ok(mut inv) = inventory.read_with(g.token()) else {
                    g.release().await?;
                    continue;
                };
                if inv.stock == 0 {
                    g.release().await?;
                    return Ok::<_, LockError>(bought);
                }
                inv.stock -= 1;
                inv.sold.push(UNITS - inv.stock);
                let left = inv.stock;
                if inventory.write(g.token(), inv).is_applied() {
                    bought += 1;
                    let mut m = min_stock.lock().unwrap_or_else(|p| p.into_inner());
                    *m = (*m).min(left);
                    if left % 25 == 0 {
                        println!(
                            "  worker {w} sold a unit under token {}; {left} left",
                            g.token()
                        );
                    }
                }
                g.release().await?;
            }
        }));
    }
    let mut per_worker = Vec::new();
    for w in workers {
        per_worker.push(w.await.map_err(|e| LockError::Protocol(e.to_string()))??);
    }
    let inv = inventory.read();
    let mut sold = inv.sold.clone();
    sold.sort_unstable();
    sold.dedup();
    let unique = sold.len() == inv.sold.len() && sold.len() == UNITS as usize;
    println!(
        "  sold out in {:.0} ms; units per worker {per_worker:?}; stock {}",
        started.elapsed().as_secs_f64() * 1e3,
        inv.stock
    );

    // A worker pauses past its lease (it stops renewing, as a SIGSTOPped process would;
    // for a session lock its heartbeats stop: its connection goes dark), another takes
    // the lock, then the paused one wakes and tries its stale write.
    let restock = Arc::new(Fenced::new(0u32));
    let lease = Duration::from_millis(400);
    let (paused, dark) = match (t.session_timeout, t.cuttable.as_ref()) {
        (Some(_), Some(cuttable)) => {
            let (b, cut) = cuttable().await?;
            (LockClient::from_arc(b).with_options(opts()), Some(cut))
        }
        _ => (client(&t).await?, None),
    };
    let p_opts = opts().lease(lease).auto_renew(false);
    let gp = paused.acquire_with(&key, &p_opts).await?;
    let stale_read = restock
        .read_with(gp.token())
        .map_err(|e| LockError::Protocol(e.to_string()))?;
    let pause = match (&dark, t.session_timeout) {
        (Some(cut), Some(session)) => {
            cut.set_cut(true);
            session + Duration::from_secs(1)
        }
        _ => lease * 3,
    };
    println!(
        "  worker P holds token {} and pauses for {:?} ({})",
        gp.token(),
        pause,
        match t.session_timeout {
            Some(s) => format!("session timeout {s:?}"),
            None => format!("lease {lease:?}"),
        }
    );
    sleep(pause).await;
    let other = client(&t).await?;
    let gq = other.acquire(&key).await?;
    if !restock.write(gq.token(), stale_read + 10).is_applied() {
        return Err(LockError::Protocol(
            "the newest holder's write was refused".into(),
        ));
    }
    println!(
        "  worker Q took the lock with token {} and restocked to 10",
        gq.token()
    );
    gq.release().await?;
    let late = restock.write(gp.token(), stale_read + 5);
    let late_write = match &late {
        FencedWrite::Refused { highest } => {
            println!(
                "  worker P woke and wrote with token {}: refused (the fence had seen {highest})",
                gp.token()
            );
            format!("refused (token {} < {highest})", gp.token())
        }
        _ => "ACCEPTED (bug)".into(),
    };
    println!("  P's guard status after waking: {:?}", gp.status());
    if let Some(cut) = dark {
        cut.set_cut(false);
    }
    drop(gp);

    // A holder is killed mid-work: its connection dies and it never releases.
    let recovery = match t.cuttable.as_ref() {
        Some(cuttable) => {
            let (b, cut) = cuttable().await?;
            let dying = LockClient::from_arc(b).with_options(opts().lease(Duration::from_secs(1)));
            let g = dying.acquire(&key).await?;
            println!("  worker K holds token {} and is killed", g.token());
            cut.set_cut(true);
            let killed_at = Instant::now();
            drop(g);
            drop(dying);
            let g2 = client(&t).await?.acquire(&key).await?;
            let freed = killed_at.elapsed();
            println!(
                "  the lock expired and worker R got it after {:.0} ms with token {}",
                freed.as_secs_f64() * 1e3,
                g2.token()
            );
            g2.release().await?;
            format!(
                "{:.0} ms ({})",
                freed.as_secs_f64() * 1e3,
                match t.session_timeout {
                    Some(s) => format!("session {} ms", s.as_millis()),
                    None => "lease 1000 ms".into(),
                }
            )
        }
        None => "-".into(),
    };
    let min_stock = *min_stock.lock().unwrap_or_else(|p| p.into_inner());
    Ok(Row {
        backend: t.name.clone(),
        sold: inv.sold.len(),
        unique,
        min_stock,
        ok: unique && inv.stock == 0 && matches!(late, FencedWrite::Refused { .. }),
        late_write,
        recovery,
    })
}
