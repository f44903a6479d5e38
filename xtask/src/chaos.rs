//! `cargo xtask chaos [--quick] [--seed n] [--lanes n] [--only scenario] [backend...]`: fault injection against real
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

use lock_conformance::history::{
    check_events, lease_findings, Event, LeaseFindings, Stamped, Violation,
};
use lock_conformance::proxy::Proxy;
use lock_tests::servers::{faketime_lib, signal, Moto, Postgres, Redis, ZooKeeper};
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
    ServerRestartPersistent,
    FailoverNoAck,
    FailoverAck,
    ClockSkew,
    PauseInFlight,
    TokenReuse,
    TokenLowered,
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
            Fault::ServerRestartPersistent => "server_killed_and_restarted_persistent",
            Fault::FailoverNoAck => "control_failover_without_replica_ack",
            Fault::FailoverAck => "failover_with_replica_ack",
            Fault::ClockSkew => "client_clock_skew",
            Fault::PauseInFlight => "client_paused_with_replies_in_flight",
            Fault::TokenReuse => "control_token_granted_twice",
            Fault::TokenLowered => "control_tokens_out_of_real_time_order",
        }
    }

    /// Negative controls: the run must flag them, with a violation of the kind they cause.
    fn control(self) -> bool {
        !self.expected().is_empty() || self == Fault::FailoverNoAck
    }

    /// The violations a negative control must be flagged with (the failover control is
    /// judged by its double grant instead).
    fn expected(self) -> &'static [Violation] {
        match self {
            Fault::ClientPauseUnfenced => &[Violation::LostUpdate, Violation::WritesWentBackwards],
            Fault::TokenReuse => &[Violation::TokenGrantedTwice],
            Fault::TokenLowered => &[Violation::TokensOutOfOrder],
            _ => &[],
        }
    }

    /// The lease the workers take (a failover needs time for the promotion and the
    /// reconnect to happen inside the first holder's lease).
    fn lease_ms(self) -> u64 {
        match self {
            Fault::FailoverNoAck | Fault::FailoverAck => 3000,
            _ => 800,
        }
    }
}

/// The scenarios each backend runs. The targets that differ from another only in a mode
/// (Redis unfair, PostgreSQL transaction scope, a three-node ZooKeeper ensemble) run the
/// negative controls and the paused holder.
fn scenarios(backend: &str) -> Vec<Fault> {
    use Fault::*;
    let controls = [ClientPause, ClientPauseUnfenced, TokenReuse, TokenLowered];
    let mut v = controls.to_vec();
    if matches!(backend, "redis-unfair" | "pg-xact" | "zk-ensemble3") {
        return v;
    }
    v.extend([
        HolderKilled,
        PartitionShort,
        PartitionLong,
        RuntimeStarved,
        CancelLoop,
        ClockSkew,
    ]);
    match backend {
        "redis" => v.extend([
            ServerPaused,
            ServerRestart,
            ServerRestartPersistent,
            ReplyLost,
            PauseInFlight,
            FailoverNoAck,
            FailoverAck,
        ]),
        "redlock" => v.extend([ServerPaused, ServerRestart, ReplyLost, PauseInFlight]),
        "zk" => v.extend([ServerPaused, ReplyLost, PauseInFlight]),
        // No restart: the emulator keeps nothing, so a restart repeats tokens by design
        // (`dynamo-moto/emulator_restart_loses_the_table_and_its_counter`); a table is durable.
        "dynamo" => v.extend([ServerPaused, ReplyLost, PauseInFlight]),
        "pg-lease" => v.extend([ServerPaused, ServerRestart, ReplyLost, PauseInFlight]),
        "pg-advisory" => v.extend([
            ServerPaused,
            ServerRestart,
            ReplyLost,
            PauseInFlight,
            BackendTerminated,
        ]),
        _ => {}
    }
    v
}

/// Servers of one backend, kept for the backend's scenarios.
// A handful exist at a time: the size of the failover variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Servers {
    Redis(Vec<Redis>),
    /// A primary and its replica; workers reach the primary (and, after a failover, the
    /// promoted replica) through one proxy each.
    RedisPair {
        primary: Redis,
        replica: Redis,
        /// A replica of the replica: after the promotion the new primary still has a
        /// replica to acknowledge grants.
        _spare: Redis,
        /// The replication link primary -> replica, through a proxy that can freeze it.
        link: Proxy,
    },
    Zk(ZooKeeper),
    Pg(Postgres),
    /// moto, the DynamoDB emulator.
    Dynamo(Moto),
}

impl Servers {
    fn addrs(&self) -> Vec<SocketAddr> {
        match self {
            Servers::Redis(v) => v.iter().map(Redis::addr).collect(),
            Servers::RedisPair { primary, .. } => vec![primary.addr()],
            Servers::Zk(z) => z
                .ports
                .iter()
                .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
                .collect(),
            Servers::Pg(p) => addr_of(&p.url()).into_iter().collect(),
            Servers::Dynamo(m) => vec![SocketAddr::from(([127, 0, 0, 1], m.port))],
        }
    }

    /// The URL a worker uses to reach the servers through `via` (one proxy per server).
    fn url_via(&self, via: &[SocketAddr]) -> String {
        match self {
            Servers::Redis(_) | Servers::RedisPair { .. } => via
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
            Servers::Dynamo(_) => format!("http://{}", via[0]),
        }
    }

    /// Pids to SIGSTOP for a server pause (one Redlock node; the ZooKeeper server).
    fn pause_pids(&self) -> Vec<u32> {
        match self {
            Servers::Redis(v) => v.first().and_then(|r| r.proc.pid()).into_iter().collect(),
            Servers::RedisPair { primary, .. } => primary.proc.pid().into_iter().collect(),
            Servers::Zk(z) => z.procs.first().and_then(|p| p.pid()).into_iter().collect(),
            Servers::Pg(p) => p.server_pids(),
            Servers::Dynamo(m) => m.proc.pid().into_iter().collect(),
        }
    }

    fn restart(&mut self) -> Result<(), String> {
        match self {
            Servers::Redis(v) => v.first_mut().ok_or("no server")?.restart(),
            Servers::RedisPair { primary, .. } => primary.restart(),
            // Immediate shutdown: no checkpoint, crash recovery at the next start (which
            // empties the unlogged token blocks of session locks).
            Servers::Pg(p) => p.crash_restart(),
            Servers::Zk(_) | Servers::Dynamo(_) => Err("not supported".into()),
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
    /// Why the scenario could not run here, if it could not.
    skipped: Option<String>,
    grants: usize,
    accepted_writes: usize,
    refused_writes: usize,
    belief_overlaps: usize,
    /// TTL backends: grants of the key inside another client's running lease.
    double_grants: Option<usize>,
    /// TTL backends: grants delivered after a grant with a higher token.
    stale_deliveries: Option<usize>,
    /// For a failure or a flagged control: the history around the first violation.
    excerpt: Vec<String>,
    recovery_ms: Option<u64>,
    violations: Vec<String>,
    /// What the workers wrote to stderr.
    stderr: Vec<String>,
    note: String,
}

impl ScenarioReport {
    /// A report with nothing measured (a harness error, a skip).
    fn empty(backend: &str, fault: Fault) -> Self {
        Self {
            backend: backend.into(),
            scenario: fault.name(),
            control: fault.control(),
            passed: false,
            skipped: None,
            grants: 0,
            accepted_writes: 0,
            refused_writes: 0,
            belief_overlaps: 0,
            double_grants: None,
            stale_deliveries: None,
            excerpt: Vec::new(),
            recovery_ms: None,
            violations: Vec::new(),
            stderr: Vec::new(),
            note: String::new(),
        }
    }
}

struct Worker {
    child: Child,
    holding: Arc<Mutex<bool>>,
    events: Arc<Mutex<Vec<Stamped>>>,
    /// What the worker wrote to stderr (its errors), kept for the report.
    stderr: Arc<Mutex<String>>,
    /// Lines on stdout that were not events.
    bad_lines: Arc<Mutex<Vec<String>>>,
    proxies: Vec<Proxy>,
}

/// The worker binary: `chaos-worker` beside this one, or `LOCK_CHAOS_WORKER` (the runners'
/// own check points it at a program that fails).
fn worker_exe() -> PathBuf {
    if let Some(w) = std::env::var_os("LOCK_CHAOS_WORKER").filter(|w| !w.is_empty()) {
        return PathBuf::from(w);
    }
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
    expiry: Duration,
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
        // A clock at half speed counts the run's seconds at half speed too.
        &if fault == Fault::ClockSkew && i == 0 {
            seconds.div_ceil(2)
        } else {
            seconds
        }
        .to_string(),
    ]);
    if fault == Fault::CancelLoop {
        cmd.args(["--cancel-rate", "0.3"]);
    }
    if fault == Fault::RuntimeStarved && i == 0 {
        // Long enough that the lock must be lost (a lease or a session limit, twice).
        cmd.args(["--starve-every", "3"]);
        cmd.args(["--starve-ms", &(expiry * 2).as_millis().to_string()]);
    }
    if fault == Fault::FailoverAck {
        cmd.args(["--replica-acks", "1"]);
    }
    if matches!(fault, Fault::FailoverAck | Fault::FailoverNoAck) {
        // Hold the lock for most of a lease (3 s): the failover happens while the
        // unreplicated holder still works.
        cmd.args(["--work-ms", "2500"]);
    }
    if fault == Fault::ClockSkew && i < 2 {
        // libfaketime fakes the clocks the worker reads through libc, monotonic included
        // (the library's deadlines and timers); the history stamps (rustix, vDSO) stay
        // true. w1's clock runs at half speed; w2's is an hour ahead.
        let lib = faketime_lib().ok_or("libfaketime is not installed")?;
        cmd.env("LD_PRELOAD", lib)
            .env("FAKETIME", if i == 0 { "+0 x0.5" } else { "+1h" })
            .env("FAKETIME_DONT_RESET", "1");
    }
    if fault == Fault::PartitionLong {
        // Holders keep the lock across the partition, so the cut-off one must lose it.
        cmd.args(["--work-ms", &(expiry * 2).as_millis().to_string()]);
    }
    if i == 0 {
        match fault {
            Fault::TokenReuse => {
                cmd.args(["--tamper", "reuse"]);
            }
            Fault::TokenLowered => {
                cmd.args(["--tamper", "lower"]);
            }
            _ => {}
        }
    }
    if matches!(fault, Fault::ClientPause | Fault::ClientPauseUnfenced) && i == 0 {
        // The worker stops itself between its read and its write, holding the lock, at
        // its first grant: Redlock is not fair, and a worker can go many seconds without
        // a grant (CI once saw w1 short of a third grant within 20 s; other runs gave a
        // worker one grant in a whole scenario).
        cmd.args(["--pause-after-read", "1"]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", worker_exe().display()))?;
    let out = child.stdout.take().ok_or("no worker stdout")?;
    let err = child.stderr.take().ok_or("no worker stderr")?;
    let holding = Arc::new(Mutex::new(false));
    let events: Arc<Mutex<Vec<Stamped>>> = Arc::default();
    let bad_lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let stderr: Arc<Mutex<String>> = Arc::default();
    let (h, ev, bad) = (holding.clone(), events.clone(), bad_lines.clone());
    tokio::spawn(async move {
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            match serde_json::from_str::<Stamped>(&l) {
                Ok(s) => {
                    match &s.event {
                        Event::Granted { .. } => {
                            *h.lock().unwrap_or_else(|p| p.into_inner()) = true
                        }
                        Event::ReleaseInvoked { .. } => {
                            *h.lock().unwrap_or_else(|p| p.into_inner()) = false
                        }
                        _ => {}
                    }
                    ev.lock().unwrap_or_else(|p| p.into_inner()).push(s);
                }
                Err(_) => bad.lock().unwrap_or_else(|p| p.into_inner()).push(l),
            }
        }
    });
    let e = stderr.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(err).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            let mut e = e.lock().unwrap_or_else(|p| p.into_inner());
            if e.len() < 4000 {
                e.push_str(&l);
                e.push('\n');
            }
        }
    });
    Ok(Worker {
        child,
        holding,
        events,
        stderr,
        bad_lines,
        proxies,
    })
}

/// Waits until some worker reports a grant stamped after `after_us` (or `limit` passes);
/// returns its index.
async fn until_granted_after(workers: &[Worker], after_us: u64, limit: Duration) -> Option<usize> {
    let t = Instant::now();
    loop {
        for (i, w) in workers.iter().enumerate() {
            let evs = w.events.lock().unwrap_or_else(|p| p.into_inner());
            if evs
                .iter()
                .rev()
                .any(|e| e.at_us > after_us && matches!(e.event, Event::Granted { .. }))
            {
                return Some(i);
            }
        }
        if t.elapsed() >= limit {
            return None;
        }
        sleep(Duration::from_millis(1)).await;
    }
}

/// Waits until worker `w` invokes an acquire stamped after `after_us`.
async fn until_invoked_after(w: &Worker, after_us: u64, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if w.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .rev()
            .any(|e| e.at_us > after_us && matches!(e.event, Event::AcquireInvoked { .. }))
        {
            return true;
        }
        sleep(Duration::from_millis(1)).await;
    }
    false
}

/// Whether process `pid` is stopped (state T in /proc).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
        .unwrap_or(false)
}

/// Waits until some worker holds the lock and returns it: the victim of a fault that must
/// hit a holder. Fails the attempt when none held within 5 s.
async fn until_holding(workers: &[Worker]) -> Result<usize, String> {
    let t = Instant::now();
    loop {
        if let Some(i) = workers.iter().position(Worker::holds) {
            return Ok(i);
        }
        if t.elapsed() > Duration::from_secs(5) {
            return Err(MISSED.to_owned() + "no worker held the lock within 5 s");
        }
        sleep(Duration::from_millis(2)).await;
    }
}

/// The prefix of an error that says the fault did not hit what it was meant to: the
/// scenario runs again (twice at most), then fails.
const MISSED: &str = "the fault missed: ";

/// Whether w1 won a grant, by an acquire invoked after another worker's grant of an equal or
/// higher token completed: the pair the checker's real-time order rule can see.
fn w1_acquired_after_another_grant(events: &[Stamped]) -> bool {
    // (completed at, token) of every grant to the others so far.
    let mut others: Vec<(u64, u64)> = Vec::new();
    let mut w1_invoked = HashMap::new();
    for e in events {
        match &e.event {
            Event::AcquireInvoked { op, client, .. } if client == "w1" => {
                w1_invoked.insert(*op, e.at_us);
            }
            Event::Granted {
                op, client, token, ..
            } if client == "w1" => {
                let invoked = w1_invoked.get(op).copied().unwrap_or(u64::MAX);
                if others.iter().any(|&(at, t)| at < invoked && t >= *token) {
                    return true;
                }
            }
            Event::Granted { token, .. } => others.push((e.at_us, *token)),
            _ => {}
        }
    }
    false
}

impl Worker {
    fn holds(&self) -> bool {
        *self.holding.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this worker reported a loss (a `Lost` event) after `after_us`.
    fn lost_after(&self, after_us: u64) -> bool {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|e| e.at_us > after_us && matches!(e.event, Event::Lost { .. }))
    }
}

struct Timing {
    lease_ms: u64,
    /// How long a dead holder keeps the lock (the lease, or the session timeout).
    expiry: Duration,
    seconds: u64,
}

fn timing(backend: &str, fault_kind: Fault, quick: bool) -> Timing {
    let lease_ms = fault_kind.lease_ms();
    let expiry = match backend {
        "zk" | "zk-ensemble3" | "pg-advisory" | "pg-xact" => Duration::from_secs(2),
        _ => Duration::from_millis(lease_ms),
    };
    let base = if quick { 3 } else { 8 };
    // Faults start after 1.5 s and the longest lasts 2 x expiry + 0.5 s: the workers must
    // keep going well after it heals, or a fault at the end of the run tests nothing.
    let fault = match fault_kind {
        // Controls that inject nothing: a tampered token shows at w1's next grants.
        Fault::TokenReuse | Fault::TokenLowered => 0,
        _ => (expiry * 2 + Duration::from_millis(500))
            .as_secs_f64()
            .ceil() as u64,
    };
    // Scenarios whose fault takes longer than the others (see `scenario`).
    let extra = match fault_kind {
        Fault::PauseInFlight => 5,
        Fault::FailoverNoAck | Fault::FailoverAck => 8,
        _ => 0,
    };
    Timing {
        lease_ms,
        expiry,
        seconds: base + fault + 2 + extra,
    }
}

async fn scenario(
    backend: &str,
    servers: &mut Servers,
    fault: Fault,
    quick: bool,
    rng: &mut rand::rngs::StdRng,
) -> Result<ScenarioReport, String> {
    let t = timing(backend, fault, quick);
    let store = Store::start(fault != Fault::ClientPauseUnfenced)
        .await
        .map_err(|e| e.to_string())?;
    // The workers stop no earlier than this (each counts its run from after it connected).
    let run_ends = now_us() + t.seconds * 1_000_000;
    let mut workers = Vec::new();
    for i in 0..WORKERS {
        workers.push(
            spawn_worker(
                backend, servers, i, store.addr, t.lease_ms, t.expiry, t.seconds, fault,
            )
            .await?,
        );
    }
    sleep(Duration::from_millis(1500)).await;
    // Faults that hit a holder pick whoever holds; the others pick at random.
    let mut victim = rng.random_range(0..WORKERS);
    let beyond = t.expiry * 2 + Duration::from_millis(500);
    let mut note;
    // The worker killed on purpose (its exit is not judged).
    let mut killed = None;
    let faulted_at = now_us();
    let healed_at: Option<u64> = match fault {
        Fault::ClientPause | Fault::ClientPauseUnfenced => {
            let pid = workers[0].child.id().unwrap_or(0);
            let t0 = Instant::now();
            while !stopped(pid) && t0.elapsed() < Duration::from_secs(20) {
                sleep(Duration::from_millis(2)).await;
            }
            if !stopped(pid) {
                return Err(format!("{MISSED}w1 never reached its pause point"));
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
            victim = until_holding(&workers).await?;
            let _ = workers[victim].child.start_kill();
            killed = Some(victim);
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
            victim = until_holding(&workers).await?;
            let r = tokio::task::block_in_place(|| servers.restart());
            r?;
            note = format!(
                "server killed while a worker held the lock, restarted{}",
                if matches!(backend, "redis" | "redlock") {
                    " without persistence: its data lost"
                } else {
                    " (immediate shutdown, crash recovery at the next start)"
                }
            );
            Some(now_us())
        }
        Fault::PartitionShort | Fault::PartitionLong => {
            victim = if fault == Fault::PartitionLong {
                // A holder just granted: it holds on long enough to lose the lock.
                until_granted_after(&workers, now_us(), Duration::from_secs(10))
                    .await
                    .ok_or(format!("{MISSED}no grant to cut off"))?
            } else {
                until_holding(&workers).await?
            };
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
            // Start while the victim holds: its release (sent after its 20 ms of work) is
            // applied by the store, its reply lost, and the release retried after the reset.
            victim = until_holding(&workers).await?;
            let from = now_us();
            for p in &workers[victim].proxies {
                p.set_drop_replies(true);
            }
            sleep(d).await;
            let to = now_us();
            for p in &workers[victim].proxies {
                p.set_drop_replies(false);
                p.reset_all();
            }
            let (mut releases, mut acquires) = (0, 0);
            for e in workers[victim]
                .events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|e| e.at_us >= from && e.at_us <= to)
            {
                match e.event {
                    Event::ReleaseInvoked { .. } => releases += 1,
                    Event::AcquireInvoked { .. } => acquires += 1,
                    _ => {}
                }
            }
            if releases + acquires == 0 {
                return Err(format!(
                    "{MISSED}w{} sent nothing while its replies were dropped",
                    victim + 1
                ));
            }
            note = format!(
                "w{} holding; its replies dropped for {} ms (meanwhile it sent {releases} release(s) and {acquires} acquire(s): applied by the store, their replies lost), then its connections reset",
                victim + 1,
                d.as_millis()
            );
            Some(now_us())
        }
        Fault::BackendTerminated => {
            victim = until_holding(&workers).await?;
            let Servers::Pg(p) = servers else {
                return Err("terminating a backend needs PostgreSQL".into());
            };
            let n = p.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND granted")?;
            if n.trim() == "0" {
                return Err(format!("{MISSED}no advisory lock holder to terminate"));
            }
            note = "the holder's PostgreSQL backend terminated".into();
            Some(now_us())
        }
        Fault::ServerRestartPersistent => {
            victim = until_holding(&workers).await?;
            tokio::task::block_in_place(|| servers.restart())?;
            note = "server (appendonly, fsync always) killed while a worker held the lock, restarted with its data".into();
            Some(now_us())
        }
        Fault::FailoverNoAck | Fault::FailoverAck => {
            let Servers::RedisPair {
                primary,
                replica,
                link,
                ..
            } = servers
            else {
                return Err("a failover needs a primary and a replica".into());
            };
            // Freeze replication at a grant: the replica keeps that holder's lock, and
            // nothing the primary does from now on (renewals, the release, the next grant)
            // reaches it.
            let start = now_us();
            let first = until_granted_after(&workers, start, Duration::from_secs(10)).await;
            link.set_cut(true);
            let frozen = now_us();
            let granted = if fault == Fault::FailoverNoAck {
                // The next holder's grant exists on the primary only.
                until_granted_after(&workers, frozen, Duration::from_secs(8)).await
            } else {
                // With acknowledgement every grant now waits for the frozen replica,
                // fails, and is given back; give the workers time to try.
                sleep(Duration::from_millis(3000)).await;
                until_granted_after(&workers, frozen, Duration::ZERO).await
            };
            if first.is_none() {
                return Err(format!("{MISSED}no grant to freeze replication at"));
            }
            if fault == Fault::FailoverNoAck && granted.is_none() {
                return Err(format!(
                    "{MISSED}no grant after the freeze: the control has nothing to lose"
                ));
            }
            primary.proc.kill9();
            link.reset_all();
            let promoted = tokio::task::block_in_place(|| {
                lock_tests::servers::ask(replica.addr(), b"REPLICAOF NO ONE\r\nQUIT\r\n")
            })
            .unwrap_or_default();
            if !promoted.starts_with("+OK") {
                return Err(format!("promoting the replica failed: {promoted:?}"));
            }
            for w in &workers {
                for p in &w.proxies {
                    p.set_upstream(replica.addr());
                    p.reset_all();
                }
            }
            note = format!(
                "replication frozen; {}; primary killed -9, replica promoted, clients redirected",
                match granted {
                    Some(i) => format!("w{} granted after the freeze", i + 1),
                    None => "no grant after the freeze".into(),
                }
            );
            Some(now_us())
        }
        Fault::ClockSkew => {
            note = "w1's clock (monotonic and wall, via libfaketime) runs at half speed; w2's is an hour ahead".into();
            None
        }
        Fault::PauseInFlight => {
            let others: Vec<u32> = workers[1..].iter().filter_map(|w| w.child.id()).collect();
            let me = workers[0].child.id().ok_or("w1 has no pid")?;
            for p in &workers[0].proxies {
                // Redlock needs two rounds within the lease: keep the delay well under half.
                p.set_reply_delay(Duration::from_millis(150));
            }
            // Stop the others so that w1's next acquire is granted at once: their queue
            // entries and leases run out meanwhile.
            for p in &others {
                signal(*p, "STOP")?;
            }
            sleep(Duration::from_millis(3500)).await;
            let t0 = now_us();
            let invoked = until_invoked_after(&workers[0], t0, Duration::from_secs(5)).await;
            // The request is out and applied; its reply is held in the proxy.
            sleep(Duration::from_millis(50)).await;
            let stopped_me = signal(me, "STOP");
            for p in &others {
                let _ = signal(*p, "CONT");
            }
            stopped_me?;
            // Who holds the key on the store now: w1's paused request, if it was granted.
            sleep(Duration::from_millis(100)).await;
            let direct = servers.url_via(&servers.addrs());
            let holder = match crate::worker_backend::backend(backend, &direct, 0).await {
                Ok(b) => {
                    let key = lock_core::LockKey::new(KEY).map_err(|e| e.to_string())?;
                    b.inspect(&key)
                        .await
                        .ok()
                        .flatten()
                        .and_then(|i| i.meta.pid)
                }
                Err(_) => None,
            };
            sleep(beyond.saturating_sub(Duration::from_millis(100))).await;
            let _ = signal(me, "CONT");
            for p in &workers[0].proxies {
                p.set_reply_delay(Duration::ZERO);
            }
            if !invoked {
                return Err(format!(
                    "{MISSED}w1 did not invoke an acquire while the others were stopped"
                ));
            }
            if holder != Some(me) {
                return Err(format!(
                    "{MISSED}w1's request in flight was not a grant (queued or refused)"
                ));
            }
            note = format!(
                "w1's replies delayed 150 ms; w1 paused {} ms right after sending an acquire that the store granted meanwhile, the others running",
                beyond.as_millis(),
            );
            Some(now_us())
        }
        Fault::TokenReuse => {
            note = "w1's backend hands every grant after its first the first grant's token".into();
            None
        }
        Fault::TokenLowered => {
            note = "w1's backend hands each grant half the store's token".into();
            None
        }
        Fault::RuntimeStarved => {
            note = format!(
                "w1 blocks its only runtime thread for {} ms after every 3rd grant",
                (t.expiry * 2).as_millis()
            );
            None
        }
        Fault::CancelLoop => {
            note = "every worker abandons 30% of its acquires after 0-20 ms".into();
            None
        }
    };
    // Let the workers finish; each must exit 0 (but the one killed on purpose), on time,
    // having written nothing but events to stdout.
    let limit = Duration::from_secs(t.seconds + 20);
    let t0 = Instant::now();
    let mut worker_faults = Vec::new();
    for (i, w) in workers.iter_mut().enumerate() {
        let left = limit.saturating_sub(t0.elapsed());
        let status = match tokio::time::timeout(left, w.child.wait()).await {
            Ok(s) => s.ok(),
            Err(_) => {
                let _ = w.child.start_kill();
                worker_faults.push(format!("w{} hung: killed after {limit:?}", i + 1));
                None
            }
        };
        if killed != Some(i) {
            if let Some(st) = status.filter(|s| !s.success()) {
                let err = w.stderr.lock().unwrap_or_else(|p| p.into_inner()).clone();
                worker_faults.push(format!(
                    "w{} exited with {st}: {}",
                    i + 1,
                    err.lines().last().unwrap_or("(no stderr)")
                ));
            }
        }
        let bad = w
            .bad_lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(l) = bad.first() {
            worker_faults.push(format!(
                "w{} wrote {} line(s) that are not events, the first: {l:?}",
                i + 1,
                bad.len()
            ));
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
        if let Event::LeaseBound { until_us, .. } = &mut e.event {
            *until_us = until_us.saturating_sub(start);
        }
    }
    let finals: HashMap<String, u64> = store
        .values
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), v.0))
        .collect();
    // The whole history, for whoever wants to read a failure (or a flagged control).
    let _ = std::fs::create_dir_all("target/chaos/histories");
    let _ = std::fs::write(
        format!("target/chaos/histories/{backend}-{}.jsonl", fault.name()),
        events
            .iter()
            .filter_map(|e| serde_json::to_string(e).ok())
            .collect::<Vec<_>>()
            .join("\n"),
    );
    // A tampered token shows only at the tampered worker's grants (reused: from its second),
    // a starved runtime only after w1's third, and a healed fault's recovery only while the
    // others still run: without them the scenario showed nothing, and runs again.
    let w1_grants = events
        .iter()
        .filter(|e| matches!(&e.event, Event::Granted { client, .. } if client == "w1"))
        .count();
    let needed = match fault {
        Fault::TokenReuse => 2,
        // It blocks its runtime after every third grant.
        Fault::RuntimeStarved => 3,
        _ => 0,
    };
    if w1_grants < needed {
        return Err(format!(
            "{MISSED}w1, the worker the fault is about, was granted {w1_grants} time(s)"
        ));
    }
    // A lowered token is out of real-time order only against a grant that completed before
    // w1 invoked the acquire: one long acquire overlapping every other grant shows nothing.
    if fault == Fault::TokenLowered && !w1_acquired_after_another_grant(&events) {
        return Err(format!(
            "{MISSED}w1 was granted {w1_grants} time(s), never after another worker's higher grant"
        ));
    }
    let recovery_bound_us = (t.expiry + Duration::from_secs(5)).as_micros() as u64;
    if recovery_ms.is_none() && healed_at.is_some_and(|h| h + recovery_bound_us > run_ends) {
        return Err(format!(
            "{MISSED}the fault healed too close to the end of the run to see a grant after it"
        ));
    }
    let report = check_events(&events, &finals);
    // What the lease lets us conclude, wherever grants carry a deadline (TTL leases and
    // PostgreSQL's kept-alive sessions; a ZooKeeper session ends on the server's schedule).
    let ttl = !matches!(backend, "zk" | "zk-ensemble3");
    let lease = if ttl {
        lease_findings(&events, t.expiry)
    } else {
        LeaseFindings::default()
    };
    let mut violations = report.violations.clone();
    let flagged = if fault == Fault::FailoverNoAck {
        // The known limit: a grant the replica never saw is lost in the failover, and
        // the key is granted again inside the first lease.
        violations.extend(lease.double_grants.iter().take(1).cloned());
        !lease.double_grants.is_empty()
    } else if fault.control() {
        fault.expected().iter().any(|k| report.kinds.contains(k))
    } else {
        !report.ok()
    };
    // Where the store forgets a grant by design (a restart that loses data, a PostgreSQL
    // session the server ends early), two clients may believe at once: the fence is what
    // protects, and the checker judges it. Everywhere else a double grant is a failure.
    let session_ends = matches!(backend, "pg-advisory" | "pg-xact");
    let forgets = match fault {
        Fault::ServerRestart => backend == "redis" || session_ends,
        // A PostgreSQL session ends (and frees its lock) as soon as its process dies.
        Fault::HolderKilled => session_ends,
        Fault::BackendTerminated | Fault::FailoverNoAck => true,
        _ => false,
    };
    let mut failures: Vec<String> = Vec::new();
    if ttl && !forgets && !fault.control() && !lease.double_grants.is_empty() {
        failures.extend(lease.double_grants.iter().take(2).cloned());
    }
    if ttl && !fault.control() && !lease.stale_deliveries.is_empty() {
        failures.extend(lease.stale_deliveries.iter().take(2).cloned());
    }
    // The fault's effect, where one must follow.
    let lost_after_fault = workers[victim].lost_after(faulted_at);
    match fault {
        Fault::ClientPause if report.refused_writes == 0 => {
            failures.push("the paused holder's late write was not refused".into())
        }
        Fault::PartitionLong if !lost_after_fault => failures.push(format!(
            "w{} was cut off from its lock but never reported it lost",
            victim + 1
        )),
        // The backend terminated is whoever held when the command ran.
        Fault::BackendTerminated if !workers.iter().any(|w| w.lost_after(faulted_at)) => {
            failures.push("no worker reported the terminated backend's lock lost".into())
        }
        Fault::RuntimeStarved if !workers[0].lost_after(faulted_at) => {
            failures.push("the starved worker never reported a loss".into())
        }
        _ => {}
    }
    // A recovery bound: after the fault heals (or its victim dies), someone is granted
    // within the time a dead holder may keep the key, plus 5 s.
    let bound_ms = (t.expiry + Duration::from_secs(5)).as_millis() as u64;
    if healed_at.is_some() && !fault.control() {
        match recovery_ms {
            Some(ms) if ms <= bound_ms => {}
            Some(ms) => failures.push(format!(
                "first grant {ms} ms after the fault healed (bound {bound_ms} ms)"
            )),
            None => failures.push("no grant after the fault healed".into()),
        }
    }
    // The workers themselves must have run cleanly, in every scenario.
    failures.extend(worker_faults);
    violations.extend(failures.iter().cloned());
    let passed = judge(fault.control(), flagged, &failures, report.grants);
    // For a failure, or a flagged control: the stretch of history around the first
    // violation (the full history is in target/chaos/histories/).
    let excerpt = if !violations.is_empty() {
        violations
            .first()
            .map(|v| excerpt_around(&events, v, t.lease_ms))
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    if fault.control() {
        note.push_str(if flagged {
            "; flagged, as it must be"
        } else {
            "; NOT flagged with the violation it causes: the control failed"
        });
    }
    if report.grants == 0 {
        note.push_str("; no grants at all");
    }
    let stderr: Vec<String> = workers
        .iter()
        .enumerate()
        .filter_map(|(i, w)| {
            let e = w.stderr.lock().unwrap_or_else(|p| p.into_inner()).clone();
            (!e.is_empty()).then(|| format!("w{}: {}", i + 1, e.trim()))
        })
        .collect();
    Ok(ScenarioReport {
        backend: backend.into(),
        scenario: fault.name(),
        control: fault.control(),
        passed,
        skipped: None,
        grants: report.grants,
        accepted_writes: report.accepted_writes,
        refused_writes: report.refused_writes,
        belief_overlaps: report.belief_overlaps,
        double_grants: ttl.then_some(lease.double_grants.len()),
        stale_deliveries: ttl.then_some(lease.stale_deliveries.len()),
        recovery_ms,
        violations: violations.into_iter().take(4).collect(),
        excerpt,
        stderr,
        note,
    })
}

/// Whether a scenario passed: a negative control must be flagged (with the violation it
/// causes), anything else must not be, and either way nothing else may have failed
/// (workers that crashed or hung, a fault without its effect, a double grant) and a
/// scenario that is not a control must have granted the lock at all.
fn judge(control: bool, flagged: bool, failures: &[String], grants: usize) -> bool {
    failures.is_empty()
        && if control {
            flagged
        } else {
            !flagged && grants > 0
        }
}

/// The events within one lease before and 100 ms after the first time (`.. at N us`) a
/// violation message names, at most 40 of them, closest to that time, in order.
fn excerpt_around(events: &[Stamped], violation: &str, lease_ms: u64) -> Vec<String> {
    let at = violation
        .split(" us")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse::<u64>().ok());
    let Some(at) = at else { return Vec::new() };
    let from = at.saturating_sub(lease_ms * 1000);
    let mut near: Vec<&Stamped> = events
        .iter()
        .filter(|e| e.at_us >= from && e.at_us <= at + 100_000)
        .collect();
    near.sort_by_key(|e| e.at_us.abs_diff(at));
    near.truncate(40);
    near.sort_by_key(|e| e.at_us);
    near.iter()
        .map(|e| {
            format!(
                "{} us {}",
                e.at_us,
                serde_json::to_string(&e.event).unwrap_or_default()
            )
        })
        .collect()
}

/// A primary, its replica (replicating through a proxy that can freeze the link), and a
/// replica of the replica.
async fn failover_servers() -> Result<Servers, String> {
    let primary = tokio::task::spawn_blocking(|| Redis::start(false))
        .await
        .map_err(|e| e.to_string())??;
    let link = Proxy::start(primary.addr())
        .await
        .map_err(|e| e.to_string())?;
    let port = link.addr().port();
    let (replica, spare) = tokio::task::spawn_blocking(move || {
        let replica = Redis::start_replica(port)?;
        wait_replica_synced(&replica)?;
        let spare = Redis::start_replica(replica.port)?;
        wait_replica_synced(&spare)?;
        Ok::<_, String>((replica, spare))
    })
    .await
    .map_err(|e| e.to_string())??;
    Ok(Servers::RedisPair {
        primary,
        replica,
        _spare: spare,
        link,
    })
}

/// Waits until a replica has finished its initial sync with its primary.
fn wait_replica_synced(replica: &Redis) -> Result<(), String> {
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        let info = lock_tests::servers::ask(replica.addr(), b"INFO replication\r\nQUIT\r\n")
            .unwrap_or_default();
        if info.contains("master_link_status:up") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err("the replica did not sync within 10 s".into())
}

async fn servers_for(backend: &str) -> Result<Servers, String> {
    let b = backend.to_owned();
    tokio::task::spawn_blocking(move || match b.as_str() {
        "redis" => Redis::start(false).map(|r| Servers::Redis(vec![r])),
        "redlock" => (0..5)
            .map(|_| Redis::start(false))
            .collect::<Result<Vec<_>, _>>()
            .map(Servers::Redis),
        "redis-unfair" => Redis::start(false).map(|r| Servers::Redis(vec![r])),
        "zk" => ZooKeeper::start(1).map(Servers::Zk),
        "zk-ensemble3" => ZooKeeper::start(3).map(Servers::Zk),
        "dynamo" => Moto::start().map(Servers::Dynamo),
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
    // `--lanes n`: backends run n at a time, each on servers of its own. The harness mostly
    // waits (faults are timed): four lanes use about half of two cores.
    let lanes: usize = args
        .iter()
        .position(|a| a == "--lanes")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1);
    // `--only s`: the scenarios whose name contains `s`.
    let only: Option<String> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let all = [
        "redis",
        "redis-unfair",
        "redlock",
        "zk",
        "zk-ensemble3",
        "pg-lease",
        "pg-advisory",
        "pg-xact",
        "dynamo",
        "mongo",
    ];
    let named: Vec<&'static str> = all
        .iter()
        .copied()
        .filter(|b| args.iter().any(|a| a == b))
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
    // Longest first, so that no lane ends with a long backend on its own.
    let mut queue = chosen.clone();
    queue.sort_by_key(|b| {
        std::cmp::Reverse(
            scenarios(b)
                .iter()
                .map(|f| timing(b, *f, quick).seconds)
                .sum::<u64>(),
        )
    });
    let queue = Arc::new(Mutex::new(std::collections::VecDeque::from(queue)));
    let mut tasks = Vec::new();
    for _ in 0..lanes {
        let (queue, only) = (queue.clone(), only.clone());
        tasks.push(tokio::spawn(async move {
            let mut reports = Vec::new();
            loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                let Some(b) = next else { break };
                reports.extend(backend_run(b, seed, quick, only.as_deref()).await);
            }
            reports
        }));
    }
    let mut reports = Vec::new();
    for t in tasks {
        match t.await {
            Ok(r) => reports.extend(r),
            Err(e) => {
                eprintln!("chaos lane failed: {e}");
                return false;
            }
        }
    }
    // The report lists backends in their usual order, whichever lane ran them.
    reports.sort_by_key(|r| all.iter().position(|b| *b == r.backend));
    let _ = std::fs::create_dir_all("target/chaos");
    let _ = std::fs::write(
        "target/chaos/report.json",
        serde_json::to_string_pretty(&reports).unwrap_or_default(),
    );
    let _ = std::fs::write("target/chaos/report.md", markdown(&reports, seed, quick));
    let passed = reports.iter().filter(|r| r.passed).count();
    let skipped = reports.iter().filter(|r| r.skipped.is_some()).count();
    let failed = reports.len() - passed - skipped;
    println!("\nchaos: {passed} passed, {failed} failed, {skipped} skipped");
    failed == 0
}

/// Runs one backend's scenarios on servers of its own.
async fn backend_run(b: &str, seed: u64, quick: bool, only: Option<&str>) -> Vec<ScenarioReport> {
    // Each backend draws from its own seeded generator: a backend run alone, or in another
    // lane, makes the same choices.
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        b.bytes()
            .fold(seed, |h, c| h.wrapping_mul(31).wrapping_add(u64::from(c))),
    );
    let mut reports = Vec::new();
    println!("\n=== chaos {b} (seed {seed})");
    let servers = if b == "mongo" {
        Err("the chaos worker has no MongoDB backend: no MongoDB server can be obtained on this machine to build and check one against".to_owned())
    } else {
        servers_for(b)
            .await
            .map_err(|e| format!("cannot start its servers: {e}"))
    };
    let mut servers = match servers {
        Ok(s) => s,
        Err(why) => {
            // Only MongoDB cannot exist here: a server that did not start fails the run.
            let mongo = b == "mongo";
            println!("{} {b}: {why}", if mongo { "SKIPPED" } else { "FAIL" });
            for fault in scenarios(b) {
                if only.is_some_and(|o| !lock_tests::selected(o, fault.name())) {
                    continue;
                }
                reports.push(ScenarioReport {
                    skipped: mongo.then(|| why.clone()),
                    violations: if mongo { Vec::new() } else { vec![why.clone()] },
                    ..ScenarioReport::empty(b, fault)
                });
            }
            return reports;
        }
    };
    for fault in scenarios(b) {
        if only.is_some_and(|o| !lock_tests::selected(o, fault.name())) {
            continue;
        }
        let blank =
            |passed: bool, skipped: Option<String>, violations: Vec<String>| ScenarioReport {
                passed,
                skipped,
                violations,
                ..ScenarioReport::empty(b, fault)
            };
        if fault == Fault::ClockSkew && faketime_lib().is_none() {
            let r = blank(
                false,
                Some("libfaketime is not installed (apt-get install faketime)".into()),
                Vec::new(),
            );
            println!(
                "SKIPPED {b}/{}: {}",
                r.scenario,
                r.skipped.as_deref().unwrap_or("")
            );
            reports.push(r);
            continue;
        }
        let began = Instant::now();
        let mut res = Err(String::new());
        for attempt in 0..3 {
            // Scenarios that need servers of their own (persistence, a replica), fresh
            // for each attempt.
            let own = match fault {
                Fault::ServerRestartPersistent => Some(
                    tokio::task::spawn_blocking(|| {
                        Redis::start(true).map(|r| Servers::Redis(vec![r]))
                    })
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r),
                ),
                Fault::FailoverNoAck | Fault::FailoverAck => Some(failover_servers().await),
                _ => None,
            };
            res = match own {
                Some(Ok(mut own)) => scenario(b, &mut own, fault, quick, &mut rng).await,
                Some(Err(e)) => Err(format!("cannot start this scenario's servers: {e}")),
                None => scenario(b, &mut servers, fault, quick, &mut rng).await,
            };
            match &res {
                Err(e) if e.starts_with(MISSED) && attempt < 2 => {
                    println!("AGAIN {b}/{}: {e}", fault.name());
                }
                _ => break,
            }
        }
        let r = match res {
            Ok(r) => r,
            Err(e) => blank(false, None, vec![format!("harness error: {e}")]),
        };
        let lease = match (r.double_grants, r.stale_deliveries) {
            (Some(d), Some(s)) => format!(", {d} double grants, {s} stale deliveries"),
            _ => String::new(),
        };
        println!(
            "{} {b}/{} ({:.0} s): {} grants, {} accepted, {} refused, {} overlaps{lease}, recovery {}; {}{}{}",
            if r.passed { "PASS" } else { "FAIL" },
            r.scenario,
            began.elapsed().as_secs_f64(),
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
            },
            // One print per scenario: lanes running side by side do not interleave.
            if !r.passed && !r.excerpt.is_empty() {
                format!(
                    "\n      history around the first violation:\n        {}",
                    r.excerpt.join("\n        ")
                )
            } else {
                String::new()
            }
        );
        reports.push(r);
    }
    drop(servers);
    reports
}

fn markdown(reports: &[ScenarioReport], seed: u64, quick: bool) -> String {
    let mut s = format!(
        "Seed {seed}, {}. Three worker processes per scenario, lease 800 ms (failover scenarios: 3 s; ZooKeeper: 2 s session; PostgreSQL advisory: 2 s session, freed by the server after 2.5 s). Double grants and stale deliveries are computed for TTL backends only.\n\n| backend | scenario | result | grants | accepted | refused | overlaps | double grants | stale deliveries | recovery | note |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        if quick { "--quick" } else { "full" }
    );
    let opt = |v: Option<usize>| v.map_or(String::new(), |n| n.to_string());
    for r in reports {
        let result = match (&r.skipped, r.passed, r.control) {
            (Some(_), _, _) => "skipped",
            (None, true, true) => "flagged (control)",
            (None, true, false) => "pass",
            (None, false, _) => "**FAIL**",
        };
        let note = match &r.skipped {
            Some(why) => why.clone(),
            None => r.note.clone(),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.backend,
            r.scenario,
            result,
            r.grants,
            r.accepted_writes,
            r.refused_writes,
            r.belief_overlaps,
            opt(r.double_grants),
            opt(r.stale_deliveries),
            r.recovery_ms.map_or(String::new(), |m| format!("{m} ms")),
            note.replace('|', "/")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scenario_passes_only_on_its_own_terms() {
        let none: &[String] = &[];
        let some = ["w1 exited with exit status: 1".to_owned()];
        assert!(judge(false, false, none, 10));
        assert!(!judge(false, true, none, 10), "a violation fails");
        assert!(!judge(false, false, none, 0), "no grant at all fails");
        assert!(!judge(false, false, &some, 10), "a crashed worker fails");
        assert!(judge(true, true, none, 10));
        assert!(!judge(true, false, none, 10), "an unflagged control fails");
        assert!(
            !judge(true, true, &some, 10),
            "a crashed worker fails a control too"
        );
    }

    #[test]
    fn every_control_names_what_must_flag_it() {
        for f in [
            Fault::ClientPauseUnfenced,
            Fault::TokenReuse,
            Fault::TokenLowered,
        ] {
            assert!(f.control() && !f.expected().is_empty(), "{f:?}");
        }
        assert!(Fault::FailoverNoAck.control());
        assert!(!Fault::ClientPause.control());
    }

    #[test]
    fn a_lowered_token_counts_only_after_a_higher_grant_completed() {
        let at = |at_us, event| Stamped { at_us, event };
        let invoked = |op, client: &str| Event::AcquireInvoked {
            op,
            client: client.into(),
            key: "k".into(),
        };
        let granted = |op, client: &str, token| Event::Granted {
            op,
            client: client.into(),
            key: "k".into(),
            token,
        };
        // w1's one acquire overlaps w2's grant: nothing the checker can see.
        let overlapping = [
            at(0, invoked(1, "w1")),
            at(1, invoked(2, "w2")),
            at(2, granted(2, "w2", 100)),
            at(3, granted(1, "w1", 50)),
        ];
        assert!(!w1_acquired_after_another_grant(&overlapping));
        // Invoked after w2's grant of a higher token completed: out of order.
        let after = [
            at(1, invoked(2, "w2")),
            at(2, granted(2, "w2", 100)),
            at(3, invoked(1, "w1")),
            at(4, granted(1, "w1", 50)),
        ];
        assert!(w1_acquired_after_another_grant(&after));
        // After a lower one only: in order.
        let lower = [
            at(1, invoked(2, "w2")),
            at(2, granted(2, "w2", 10)),
            at(3, invoked(1, "w1")),
            at(4, granted(1, "w1", 50)),
        ];
        assert!(!w1_acquired_after_another_grant(&lower));
    }
}
