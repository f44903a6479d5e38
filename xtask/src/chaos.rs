//! `cargo xtask chaos [--quick] [--seed n] [backend...]`: fault injection against real
//! servers. Three worker PROCESSES per run (`chaos-worker`) acquire one key, do a
//! read-modify-write of a counter on a fenced store held by this harness, and release;
//! every lock event (from the workers) and every write (from the store) is stamped on the
//! host-wide monotonic clock, merged, and judged by the history checker. Each fault is a
//! named, seeded, time-bounded scenario. Negative controls (fencing off under a client
//! pause) must be flagged; a control that is not flagged fails the run.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lock_conformance::history::{check_events, Event, Stamped};
use lock_conformance::proxy::Proxy;
use lock_tests::servers::{signal, Postgres, Redis, ZooKeeper};
use lock_tests::targets::addr_of;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::time::{sleep, Instant};

fn now_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0) / 1000
}

const WORKERS: usize = 3;
const KEY: &str = "chaos";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Fault {
    ClientPause,
    ClientPauseUnfenced,
    HolderKilled,
    ServerPaused,
    ServerRestart,
    PartitionShort,
    PartitionLong,
    ReplyLost,
    RuntimeStarved,
    CancelLoop,
    BackendTerminated,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::ClientPause => "client_paused_past_lease",
            Fault::ClientPauseUnfenced => "control_client_pause_without_fence",
            Fault::HolderKilled => "holder_killed",
            Fault::ServerPaused => "server_paused",
            Fault::ServerRestart => "server_killed_and_restarted",
            Fault::PartitionShort => "partition_shorter_than_lease",
            Fault::PartitionLong => "partition_longer_than_lease",
            Fault::ReplyLost => "replies_lost_then_connection_reset",
            Fault::RuntimeStarved => "renewal_starvation",
            Fault::CancelLoop => "acquire_cancel_release_loop",
            Fault::BackendTerminated => "pg_backend_terminated",
        }
    }

    fn control(self) -> bool {
        self == Fault::ClientPauseUnfenced
    }
}

/// The scenarios each backend runs.
fn scenarios(backend: &str) -> Vec<Fault> {
    use Fault::*;
    let mut v = vec![
        ClientPause,
        ClientPauseUnfenced,
        HolderKilled,
        PartitionShort,
        PartitionLong,
        RuntimeStarved,
        CancelLoop,
    ];
    match backend {
        "redis" => v.extend([ServerPaused, ServerRestart, ReplyLost]),
        "redlock" => v.extend([ServerPaused, ServerRestart]),
        "zk" => v.extend([ServerPaused, ReplyLost]),
        "pg-lease" => v.extend([ServerRestart, ReplyLost]),
        "pg-advisory" => v.extend([ServerRestart, BackendTerminated]),
        _ => {}
    }
    v
}

/// Servers of one backend, kept for the backend's scenarios.
enum Servers {
    Redis(Vec<Redis>),
    Zk(ZooKeeper),
    Pg(Postgres),
}

impl Servers {
    fn addrs(&self) -> Vec<SocketAddr> {
        match self {
            Servers::Redis(v) => v.iter().map(Redis::addr).collect(),
            Servers::Zk(z) => z
                .ports
                .iter()
                .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
                .collect(),
            Servers::Pg(p) => addr_of(&p.url()).into_iter().collect(),
        }
    }

    /// The URL a worker uses to reach the servers through `via` (one proxy per server).
    fn url_via(&self, via: &[SocketAddr]) -> String {
        match self {
            Servers::Redis(_) => via
                .iter()
                .map(|a| format!("redis://{a}"))
                .collect::<Vec<_>>()
                .join(","),
            Servers::Zk(_) => via
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            Servers::Pg(_) => format!("postgres://postgres@{}/postgres", via[0]),
        }
    }

    /// Pids to SIGSTOP for a server pause (one Redlock node; the ZooKeeper server).
    fn pause_pids(&self) -> Vec<u32> {
        match self {
            Servers::Redis(v) => v.first().and_then(|r| r.proc.pid()).into_iter().collect(),
            Servers::Zk(z) => z.procs.first().and_then(|p| p.pid()).into_iter().collect(),
            Servers::Pg(_) => Vec::new(),
        }
    }

    fn restart(&mut self) -> Result<(), String> {
        match self {
            Servers::Redis(v) => v.first_mut().ok_or("no server")?.restart(),
            Servers::Pg(p) => p.restart(),
            Servers::Zk(_) => Err("not supported".into()),
        }
    }
}

/// The fenced store: a counter per key. `GET key token` and `PUT .. token ..` are refused
/// when the token is lower than the highest seen, and both raise it (unless fencing is off,
/// for the negative control). Records every write with its outcome.
struct Store {
    addr: SocketAddr,
    events: Arc<Mutex<Vec<Stamped>>>,
    values: Arc<Mutex<HashMap<String, (u64, u64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Store {
    async fn start(fenced: bool) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let events: Arc<Mutex<Vec<Stamped>>> = Arc::default();
        let values: Arc<Mutex<HashMap<String, (u64, u64)>>> = Arc::default();
        let (ev, vals) = (events.clone(), values.clone());
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (ev, vals) = (ev.clone(), vals.clone());
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let parts: Vec<&str> = line.split_whitespace().collect();
                        let reply = match parts.as_slice() {
                            ["GET", key, token] => {
                                // A read for a read-modify-write carries the token and
                                // raises the fence, so an older holder cannot write between
                                // this read and the write that follows it.
                                let token: u64 = token.parse().unwrap_or(0);
                                let mut v = vals.lock().unwrap_or_else(|p| p.into_inner());
                                let e = v.entry((*key).to_owned()).or_insert((0, 0));
                                if fenced && token < e.1 {
                                    format!("REFUSED {}", e.1)
                                } else {
                                    if fenced {
                                        e.1 = token;
                                    }
                                    e.0.to_string()
                                }
                            }
                            ["PUT", client, key, token, value] => {
                                let token: u64 = token.parse().unwrap_or(0);
                                let value: u64 = value.parse().unwrap_or(0);
                                let mut v = vals.lock().unwrap_or_else(|p| p.into_inner());
                                let e = v.entry((*key).to_owned()).or_insert((0, 0));
                                let accepted = !fenced || token >= e.1;
                                if accepted {
                                    *e = (value, e.1.max(token));
                                }
                                ev.lock().unwrap_or_else(|p| p.into_inner()).push(Stamped {
                                    at_us: now_us(),
                                    event: Event::Write {
                                        client: (*client).to_owned(),
                                        key: (*key).to_owned(),
                                        token,
                                        accepted,
                                        value,
                                    },
                                });
                                if accepted {
                                    "OK".to_owned()
                                } else {
                                    format!("REFUSED {}", e.1)
                                }
                            }
                            _ => "ERR".to_owned(),
                        };
                        if w.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Ok(Self {
            addr,
            events,
            values,
            task,
        })
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one scenario reports.
#[derive(Debug, Serialize)]
struct ScenarioReport {
    backend: String,
    scenario: &'static str,
    control: bool,
    passed: bool,
    grants: usize,
    accepted_writes: usize,
    refused_writes: usize,
    belief_overlaps: usize,
    recovery_ms: Option<u64>,
    violations: Vec<String>,
    note: String,
}

struct Worker {
    child: Child,
    holding: Arc<Mutex<bool>>,
    events: Arc<Mutex<Vec<Stamped>>>,
    proxies: Vec<Proxy>,
}

fn worker_exe() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("chaos-worker")))
        .unwrap_or_else(|| PathBuf::from("target/debug/chaos-worker"))
}

#[allow(clippy::too_many_arguments)]
async fn spawn_worker(
    backend: &str,
    servers: &Servers,
    i: usize,
    store: SocketAddr,
    lease_ms: u64,
    seconds: u64,
    fault: Fault,
) -> Result<Worker, String> {
    let mut proxies = Vec::new();
    for a in servers.addrs() {
        proxies.push(Proxy::start(a).await.map_err(|e| e.to_string())?);
    }
    let via: Vec<SocketAddr> = proxies.iter().map(Proxy::addr).collect();
    let mut cmd = Command::new(worker_exe());
    cmd.args([
        backend,
        &servers.url_via(&via),
        KEY,
        &format!("w{}", i + 1),
        &store.to_string(),
        &lease_ms.to_string(),
        &seconds.to_string(),
    ]);
    if fault == Fault::CancelLoop {
        cmd.args(["--cancel-rate", "0.3"]);
    }
    if fault == Fault::RuntimeStarved && i == 0 {
        cmd.args(["--starve-every", "3"]);
    }
    if matches!(fault, Fault::ClientPause | Fault::ClientPauseUnfenced) && i == 0 {
        // The worker stops itself between its read and its write, holding the lock.
        cmd.args(["--pause-after-read", "3"]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", worker_exe().display()))?;
    let out = child.stdout.take().ok_or("no worker stdout")?;
    let holding = Arc::new(Mutex::new(false));
    let events: Arc<Mutex<Vec<Stamped>>> = Arc::default();
    let (h, ev) = (holding.clone(), events.clone());
    tokio::spawn(async move {
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if let Ok(s) = serde_json::from_str::<Stamped>(&l) {
                match &s.event {
                    Event::Granted { .. } => *h.lock().unwrap_or_else(|p| p.into_inner()) = true,
                    Event::ReleaseInvoked { .. } => {
                        *h.lock().unwrap_or_else(|p| p.into_inner()) = false
                    }
                    _ => {}
                }
                ev.lock().unwrap_or_else(|p| p.into_inner()).push(s);
            }
        }
    });
    Ok(Worker {
        child,
        holding,
        events,
        proxies,
    })
}

/// Whether process `pid` is stopped (state T in /proc).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
        .unwrap_or(false)
}

/// Waits until worker `i` holds the lock (or 5 s pass).
async fn until_holding(w: &Worker) {
    let t = Instant::now();
    while !*w.holding.lock().unwrap_or_else(|p| p.into_inner())
        && t.elapsed() < Duration::from_secs(5)
    {
        sleep(Duration::from_millis(2)).await;
    }
}

struct Timing {
    lease_ms: u64,
    /// How long a dead holder keeps the lock (the lease, or the session timeout).
    expiry: Duration,
    seconds: u64,
}

fn timing(backend: &str, quick: bool) -> Timing {
    let lease_ms = 800;
    let expiry = match backend {
        "zk" => Duration::from_secs(2),
        "pg-advisory" => Duration::from_millis(2500),
        _ => Duration::from_millis(lease_ms),
    };
    let base = if quick { 3 } else { 8 };
    // Faults start after 1.5 s and the longest lasts 2 x expiry + 0.5 s: the workers must
    // keep going well after it heals, or a fault at the end of the run tests nothing.
    let fault = (expiry * 2 + Duration::from_millis(500))
        .as_secs_f64()
        .ceil() as u64;
    Timing {
        lease_ms,
        expiry,
        seconds: base + fault + 2,
    }
}

async fn scenario(
    backend: &str,
    servers: &mut Servers,
    fault: Fault,
    quick: bool,
    rng: &mut rand::rngs::StdRng,
) -> Result<ScenarioReport, String> {
    let t = timing(backend, quick);
    let store = Store::start(!fault.control())
        .await
        .map_err(|e| e.to_string())?;
    let mut workers = Vec::new();
    for i in 0..WORKERS {
        workers.push(
            spawn_worker(
                backend, servers, i, store.addr, t.lease_ms, t.seconds, fault,
            )
            .await?,
        );
    }
    sleep(Duration::from_millis(1500)).await;
    let victim = rng.random_range(0..WORKERS);
    let beyond = t.expiry * 2 + Duration::from_millis(500);
    let mut note;
    let healed_at: Option<u64> = match fault {
        Fault::ClientPause | Fault::ClientPauseUnfenced => {
            let pid = workers[0].child.id().unwrap_or(0);
            let t0 = Instant::now();
            while !stopped(pid) && t0.elapsed() < Duration::from_secs(20) {
                sleep(Duration::from_millis(2)).await;
            }
            if !stopped(pid) {
                return Err("w1 never reached its pause point".into());
            }
            sleep(beyond).await;
            signal(pid, "CONT")?;
            note = format!(
                "w1 paused {} ms between its read and its write, holding the lock",
                beyond.as_millis()
            );
            Some(now_us())
        }
        Fault::HolderKilled => {
            until_holding(&workers[victim]).await;
            let _ = workers[victim].child.start_kill();
            note = format!("w{} killed -9 while holding", victim + 1);
            Some(now_us())
        }
        Fault::ServerPaused => {
            let pids = servers.pause_pids();
            let d = Duration::from_millis(rng.random_range(300..1200));
            for p in &pids {
                signal(*p, "STOP")?;
            }
            sleep(d).await;
            for p in &pids {
                signal(*p, "CONT")?;
            }
            note = format!("server paused {} ms", d.as_millis());
            Some(now_us())
        }
        Fault::ServerRestart => {
            until_holding(&workers[victim]).await;
            let r = tokio::task::block_in_place(|| servers.restart());
            r?;
            note =
                "server killed while a worker held the lock, restarted (Redis: data lost)".into();
            Some(now_us())
        }
        Fault::PartitionShort | Fault::PartitionLong => {
            until_holding(&workers[victim]).await;
            let d = if fault == Fault::PartitionShort {
                t.expiry / 3
            } else {
                beyond
            };
            for p in &workers[victim].proxies {
                p.set_cut(true);
            }
            sleep(d).await;
            for p in &workers[victim].proxies {
                p.set_cut(false);
            }
            note = format!("w{} cut off {} ms while holding", victim + 1, d.as_millis());
            Some(now_us())
        }
        Fault::ReplyLost => {
            let d = Duration::from_millis(rng.random_range(100..400));
            for p in &workers[victim].proxies {
                p.set_drop_replies(true);
            }
            sleep(d).await;
            for p in &workers[victim].proxies {
                p.set_drop_replies(false);
                p.reset_all();
            }
            note = format!(
                "w{}'s replies dropped for {} ms, then its connections reset",
                victim + 1,
                d.as_millis()
            );
            Some(now_us())
        }
        Fault::BackendTerminated => {
            until_holding(&workers[victim]).await;
            if let Servers::Pg(p) = servers {
                p.psql("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted")?;
            }
            note = "the holder's PostgreSQL backend terminated".into();
            Some(now_us())
        }
        Fault::RuntimeStarved => {
            note = "w1 blocks its only runtime thread for 2 leases after every 3rd grant".into();
            None
        }
        Fault::CancelLoop => {
            note = "every worker abandons 30% of its acquires after 0-20 ms".into();
            None
        }
    };
    // Let the workers finish.
    let limit = Duration::from_secs(t.seconds + 20);
    let t0 = Instant::now();
    for w in &mut workers {
        let left = limit.saturating_sub(t0.elapsed());
        if tokio::time::timeout(left, w.child.wait()).await.is_err() {
            let _ = w.child.start_kill();
        }
    }
    sleep(Duration::from_millis(100)).await;
    let mut events: Vec<Stamped> = store
        .events
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for w in &workers {
        events.extend(
            w.events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned(),
        );
    }
    events.sort_by_key(|e| e.at_us);
    let start = events.first().map_or(0, |e| e.at_us);
    let recovery_ms = healed_at.and_then(|h| {
        events
            .iter()
            .find(|e| e.at_us > h && matches!(e.event, Event::Granted { .. }))
            .map(|e| (e.at_us - h) / 1000)
    });
    for e in &mut events {
        e.at_us -= start;
    }
    let finals: HashMap<String, u64> = store
        .values
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), v.0))
        .collect();
    let report = check_events(&events, &finals);
    let flagged = !report.ok();
    let passed = if fault.control() {
        flagged
    } else {
        !flagged && report.grants > 0
    };
    if fault.control() {
        note.push_str(if flagged {
            "; the checker flagged it, as it must"
        } else {
            "; NOT flagged: the control failed"
        });
    }
    if report.grants == 0 {
        note.push_str("; no grants at all");
    }
    Ok(ScenarioReport {
        backend: backend.into(),
        scenario: fault.name(),
        control: fault.control(),
        passed,
        grants: report.grants,
        accepted_writes: report.accepted_writes,
        refused_writes: report.refused_writes,
        belief_overlaps: report.belief_overlaps,
        recovery_ms,
        violations: report.violations.into_iter().take(3).collect(),
        note,
    })
}

async fn servers_for(backend: &str) -> Result<Servers, String> {
    let b = backend.to_owned();
    tokio::task::spawn_blocking(move || match b.as_str() {
        "redis" => Redis::start(false).map(|r| Servers::Redis(vec![r])),
        "redlock" => (0..5)
            .map(|_| Redis::start(false))
            .collect::<Result<Vec<_>, _>>()
            .map(Servers::Redis),
        "zk" => ZooKeeper::start(1).map(Servers::Zk),
        _ => Postgres::start().map(Servers::Pg),
    })
    .await
    .map_err(|e| e.to_string())?
}

pub(crate) async fn run(args: &[String]) -> bool {
    let quick = args.iter().any(|a| a == "--quick");
    let seed: u64 = args
        .iter()
        .position(|a| a == "--seed")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let all = ["redis", "redlock", "zk", "pg-lease", "pg-advisory"];
    let named: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| all.contains(a))
        .collect();
    let chosen = if named.is_empty() {
        all.to_vec()
    } else {
        named
    };
    if !worker_exe().exists() {
        eprintln!(
            "{} not found: build it with `cargo build -p xtask --bin chaos-worker`",
            worker_exe().display()
        );
        return false;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut reports = Vec::new();
    for b in chosen {
        println!("\n=== chaos {b} (seed {seed})");
        let mut servers = match servers_for(b).await {
            Ok(s) => s,
            Err(e) => {
                println!("SKIPPED {b}: cannot start its servers: {e}");
                continue;
            }
        };
        for fault in scenarios(b) {
            let r = match scenario(b, &mut servers, fault, quick, &mut rng).await {
                Ok(r) => r,
                Err(e) => ScenarioReport {
                    backend: b.into(),
                    scenario: fault.name(),
                    control: fault.control(),
                    passed: false,
                    grants: 0,
                    accepted_writes: 0,
                    refused_writes: 0,
                    belief_overlaps: 0,
                    recovery_ms: None,
                    violations: vec![format!("harness error: {e}")],
                    note: String::new(),
                },
            };
            println!(
                "{} {b}/{}: {} grants, {} accepted, {} refused, {} overlaps, recovery {}; {}{}",
                if r.passed { "PASS" } else { "FAIL" },
                r.scenario,
                r.grants,
                r.accepted_writes,
                r.refused_writes,
                r.belief_overlaps,
                r.recovery_ms.map_or("n/a".into(), |m| format!("{m} ms")),
                r.note,
                if r.violations.is_empty() {
                    String::new()
                } else {
                    format!("\n      {}", r.violations.join("\n      "))
                }
            );
            reports.push(r);
        }
        drop(servers);
    }
    let _ = std::fs::create_dir_all("target/chaos");
    let _ = std::fs::write(
        "target/chaos/report.json",
        serde_json::to_string_pretty(&reports).unwrap_or_default(),
    );
    let _ = std::fs::write("target/chaos/report.md", markdown(&reports, seed, quick));
    let passed = reports.iter().filter(|r| r.passed).count();
    let failed = reports.len() - passed;
    println!("\nchaos: {passed} passed, {failed} failed");
    failed == 0
}

fn markdown(reports: &[ScenarioReport], seed: u64, quick: bool) -> String {
    let mut s = format!(
        "Seed {seed}, {}. Three worker processes per scenario, lease 800 ms (ZooKeeper: 2 s session; PostgreSQL advisory: 2 s session, freed by the server after 2.5 s).\n\n| backend | scenario | result | grants | accepted | refused | overlaps | recovery | note |\n|---|---|---|---|---|---|---|---|---|\n",
        if quick { "--quick" } else { "full" }
    );
    for r in reports {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.backend,
            r.scenario,
            match (r.passed, r.control) {
                (true, true) => "flagged (control)",
                (true, false) => "pass",
                (false, _) => "**FAIL**",
            },
            r.grants,
            r.accepted_writes,
            r.refused_writes,
            r.belief_overlaps,
            r.recovery_ms.map_or(String::new(), |m| format!("{m} ms")),
            r.note.replace('|', "/")
        ));
    }
    s
}
