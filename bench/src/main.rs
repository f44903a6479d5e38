//! `cargo xtask bench`: every backend against the raw round trip of its own store and
//! against its peers, in ONE run on the same servers. Writes `target/bench/report.{md,json}`
//! and `target/bench/chart.svg`.
//!
//! Method (see `docs/benchmarks.md`): sequential latencies are measured one operation at a
//! time on a warmed connection; throughput runs N tasks over their own keys for a fixed
//! window; a hand-off is the time from the moment a holder starts releasing to the moment
//! the next waiter's acquire returns, with W waiters queued on one key. Every figure is
//! reported as a ratio to the store's raw round trip measured in the same run.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lock_core::{LockClient, LockOptions, WaitPolicy};
use lock_tests::servers::{Postgres, Redis, ZooKeeper};
use serde::Serialize;
use tokio::time::Instant;

mod report;

use report::{Report, Row};

#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Sequential samples per latency figure.
    samples: usize,
    /// Throughput window.
    window: Duration,
    /// Hand-offs per waiter count.
    handoffs: usize,
}

/// p50/p99 of a sample, in microseconds.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct Stats {
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) n: usize,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let pick = |q: f64| {
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    Stats {
        p50_us: pick(0.5),
        p99_us: pick(0.99),
        n: v.len(),
    }
}

type BoxErr = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxErr>;

/// Times `n` sequential runs of `op` (after 20 warm-up runs).
async fn latency<F, Fut>(n: usize, mut op: F) -> Res<Stats>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Res<()>>,
{
    for i in 0..20 {
        op(i).await?;
    }
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        op(i).await?;
        v.push(t.elapsed());
    }
    Ok(stats(v))
}

/// The idle time before a 1-waiter hand-off's release (see [`handoff`]).
const QUEUE_PAUSE: Duration = Duration::from_millis(22);

/// Times `n` runs of `op`, each after [`QUEUE_PAUSE`] of idleness: the round trip a
/// 1-waiter hand-off starts from. On an idle virtual machine a process that slept that long
/// is slow to wake, so this is context for that row, not its baseline.
async fn after_idle<F, Fut>(n: usize, mut op: F) -> Res<Stats>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Res<()>>,
{
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        tokio::time::sleep(QUEUE_PAUSE).await;
        let t = Instant::now();
        op().await?;
        v.push(t.elapsed());
    }
    Ok(stats(v))
}

/// The hand-off samples of one measurement: each is the time from the last release to the
/// next grant. Shared by the holder and its waiters.
#[derive(Default)]
struct HandoffClock {
    released_at: Mutex<Option<Instant>>,
    samples: Mutex<Vec<Duration>>,
}

impl HandoffClock {
    /// A holder starts releasing.
    fn releasing(&self) {
        *self.released_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// A waiter holds the key: one sample, from the last release.
    fn granted(&self) {
        let now = Instant::now();
        if let Some(since) = *self.released_at.lock().unwrap_or_else(|p| p.into_inner()) {
            self.samples
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(now - since);
        }
    }

    fn take(&self) -> Vec<Duration> {
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// What the machine does while a hand-off's waiters queue up.
enum Pause<'a, K> {
    /// Baseline round trips back to back: the machine as busy as when its baseline was
    /// measured, so that the hand-off and its baseline are taken alike.
    Warm(&'a K),
    /// Nothing (context: what a hand-off costs on an idle virtual machine).
    Idle,
}

impl<K> Clone for Pause<'_, K> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K> Copy for Pause<'_, K> {}

/// How long [`paired`] warms up at least: after an idle phase (the idle hand-off rows) a
/// machine answers slower for a few hundred milliseconds, which would tilt the next row.
const WARM_UP: Duration = Duration::from_millis(500);

/// Times `n` runs of `op`, each right after one run of `base` (after warm-up pairs: 20,
/// and [`WARM_UP`] at least), so that both see the same moment of a noisy machine; returns
/// the op's figures and the base's p50. Ratios of a lock cycle to its store's round trip
/// are taken this way.
async fn paired<B, BFut, F, Fut>(n: usize, base: &B, mut op: F) -> Res<(Stats, f64)>
where
    B: Fn() -> BFut,
    BFut: Future<Output = Res<()>>,
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Res<()>>,
{
    let warm = Instant::now();
    let mut i = 0;
    while i < 20 || warm.elapsed() < WARM_UP {
        base().await?;
        op(i).await?;
        i += 1;
    }
    let (mut vb, mut vo) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let t = Instant::now();
        base().await?;
        vb.push(t.elapsed());
        let t = Instant::now();
        op(i).await?;
        vo.push(t.elapsed());
    }
    Ok((stats(vo), stats(vb).p50_us))
}

/// Runs `op` in `tasks` tasks (task index given) for `window`; returns operations/s.
async fn rate<F, Fut>(tasks: usize, window: Duration, op: F) -> Res<f64>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Res<()>> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicUsize::new(0));
    let end = Instant::now() + window;
    let mut hs = Vec::new();
    for t in 0..tasks {
        let (op, done) = (op.clone(), done.clone());
        hs.push(tokio::spawn(async move {
            while Instant::now() < end {
                op(t).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, BoxErr>(())
        }));
    }
    for h in hs {
        h.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / window.as_secs_f64())
}

/// Lock cycles (acquire + release) per second with `tasks` tasks over their own keys.
async fn lock_rate(client: &LockClient, tasks: usize, window: Duration, tag: &str) -> Res<f64> {
    let (c, tag) = (client.clone(), tag.to_owned());
    rate(tasks, window, move |t| {
        let (c, k) = (c.clone(), format!("{tag}-tp-{t}"));
        async move {
            c.acquire(&k).await?.release().await?;
            Ok(())
        }
    })
    .await
}

/// Hand-off latency with `waiters` queued on one key: from the moment a holder starts
/// releasing to the moment the next waiter holds the key. Each waiter acquires once and
/// releases at once, so a round of W waiters is W hand-offs; rounds repeat until
/// `handoffs` samples are taken.
///
/// Server operations are counted from just before the holder's release to the end of the
/// round: the hand-offs themselves (release, wake-up, the woken waiter's acquire and its
/// release), not the queueing.
///
/// While the waiters queue up (the pause before the holder's release), `pause` either
/// keeps the machine as busy as when the baseline was measured, by running baseline round
/// trips back to back, or leaves it idle (see [`after_idle`] for what idleness costs on a
/// virtual machine).
#[allow(clippy::too_many_arguments)]
async fn handoff<O, Fut, K, KFut>(
    client: &LockClient,
    waiting: &LockClient,
    waiters: usize,
    handoffs: usize,
    key: &str,
    ops: &O,
    probe_cost: u64,
    pause: Pause<'_, K>,
) -> Res<(Stats, f64, Option<f64>)>
where
    O: Fn() -> Fut,
    Fut: Future<Output = Res<u64>>,
    K: Fn() -> KFut,
    KFut: Future<Output = Res<()>>,
{
    let opts = client
        .options()
        .clone()
        .wait(WaitPolicy::Timeout(Duration::from_secs(120)));
    let clock = Arc::new(HandoffClock::default());
    let rounds = handoffs.div_ceil(waiters).max(1);
    let mut server_ops = 0u64;
    // With a warm pause, baseline round trips are timed between rounds (at least 32 in
    // all), so the hand-off's ratio is to a baseline of the same minutes.
    let mut baseline = Vec::new();
    let per_round = 32usize.div_ceil(rounds).max(1);
    for _ in 0..rounds {
        let holder = client.acquire_with(key, &opts).await?;
        let mut hs = Vec::new();
        for _ in 0..waiters {
            let (c, o, k) = (waiting.clone(), opts.clone(), key.to_owned());
            let clock = clock.clone();
            hs.push(tokio::spawn(async move {
                let g = c.acquire_with(&k, &o).await?;
                clock.granted();
                clock.releasing();
                g.release().await?;
                Ok::<_, BoxErr>(())
            }));
        }
        // Let every waiter queue up.
        let wait = QUEUE_PAUSE + Duration::from_millis(2 * (waiters as u64).saturating_sub(1));
        match pause {
            Pause::Idle => tokio::time::sleep(wait).await,
            Pause::Warm(base) => {
                // A single waiter: where the store shows its queue, release as soon as the
                // waiter is in it. Otherwise (several waiters of one client may queue in
                // the client, one of them in the store), after the fixed pause. Either way
                // the machine stays busy.
                let t = Instant::now();
                let mut shows_queue = waiters == 1;
                while t.elapsed() < wait || shows_queue {
                    if shows_queue {
                        let info = client.inspect(key).await?;
                        match info.and_then(|i| i.waiters) {
                            Some(n) if n >= 1 => break,
                            Some(_) if t.elapsed() > Duration::from_secs(30) => {
                                return Err("waiters never showed in the queue".into())
                            }
                            Some(_) => {}
                            None => shows_queue = false,
                        }
                    } else {
                        base().await?;
                    }
                }
            }
        }
        let before = ops().await?;
        clock.releasing();
        holder.release().await?;
        for h in hs {
            h.await??;
        }
        server_ops += ops().await?.saturating_sub(before);
        if let Pause::Warm(base) = pause {
            for _ in 0..per_round {
                let t = Instant::now();
                base().await?;
                baseline.push(t.elapsed());
            }
        }
    }
    let v = clock.take();
    let n = v.len().max(1) as f64;
    // The counter reads themselves are not lock operations.
    let per = (server_ops as f64 - (rounds as u64 * probe_cost) as f64) / n;
    let base = (!baseline.is_empty()).then(|| stats(baseline).p50_us);
    Ok((stats(v), per, base))
}

/// One backend's `try_acquire` + `release` on a fresh lease each time, without the client
/// (no guard, no renewal): the store's share of a lock cycle.
async fn backend_only<B, R, RFut>(b: &B, who: &str, plan: Plan, base: &R, to: &str) -> Res<Row>
where
    B: lock_core::LockBackend + Clone + 'static,
    R: Fn() -> RFut,
    RFut: Future<Output = Res<()>>,
{
    use lock_core::{AcquireRequest, HolderMeta, LockKey};
    let key = LockKey::new("backend-ar")?;
    let (s, base) = paired(plan.samples, base, |_| {
        let (b, key) = (b.clone(), key.clone());
        async move {
            let req = AcquireRequest::new(
                key,
                Duration::from_secs(10),
                HolderMeta::default(),
                lock_core::Backoff::default(),
            );
            b.try_acquire(&req).await?;
            b.release(&req.lease()).await?;
            Ok(())
        }
    })
    .await?;
    Ok(Row::latency(
        who,
        "backend only: try_acquire + release",
        s,
        base,
        to,
        None,
    ))
}

/// The baselines of interleaved rows (see [`paired`]).
const PAIRED_PING: &str = "PING on the locks' connection, interleaved";
const PAIRED_SELECT: &str = "SELECT 1 on the locks' pool, interleaved";

fn opts() -> LockOptions {
    LockOptions::default()
        .lease(Duration::from_secs(10))
        .wait(WaitPolicy::Timeout(Duration::from_secs(30)))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(String::as_str)
        .collect();
    let plan = if quick {
        Plan {
            samples: 250,
            window: Duration::from_millis(1200),
            handoffs: 100,
        }
    } else {
        Plan {
            samples: 2000,
            window: Duration::from_secs(5),
            handoffs: 400,
        }
    };
    let mut report = Report::new(quick);
    let want = |b: &str| only.is_empty() || only.contains(&b);
    if want("redis") {
        section(&mut report, "redis", redis(plan)).await;
    }
    if want("pg") {
        section(&mut report, "pg", pg(plan)).await;
    }
    if want("pg") || only.contains(&"pg-fsync") {
        section(&mut report, "pg, fsync on", pg_durable(plan)).await;
    }
    if want("zk") {
        section(&mut report, "zk", zk(plan)).await;
    }
    if want("dynamo") {
        section(&mut report, "dynamo (moto)", dynamo(plan)).await;
    }
    report.note(
        "mongo",
        "SKIPPED: no MongoDB server can be obtained on this machine (not in Debian, PyPI or crates.io, no image registry); set LOCK_MONGO_URL on a machine with one",
    );
    match report.write() {
        Ok(path) => {
            println!("\n{}", report.markdown());
            println!("written to {path}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot write the report: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn section(report: &mut Report, name: &str, f: impl Future<Output = Res<Vec<Row>>>) {
    println!("=== {name}");
    match f.await {
        Ok(rows) => report.rows.extend(rows),
        Err(e) => {
            println!("{name}: FAILED: {e}");
            report.note(name, &format!("FAILED: {e}"));
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Res<T> {
    tokio::task::spawn_blocking(f)
        .await?
        .map_err(|e| -> BoxErr { e.into() })
}

/// The hand-off rows and the server-operation rows for waiters 1, 16, 256, taken with the
/// machine kept busy by `busy` (the baseline's own round trip), then the 1-waiter hand-off
/// again after an idle pause, as context.
#[allow(clippy::too_many_arguments)]
async fn handoffs<O, Fut, K, KFut>(
    b: &str,
    client: &LockClient,
    plan: Plan,
    base_us: f64,
    base_name: &str,
    target: Option<f64>,
    ops: O,
    probe_cost: u64,
    busy: K,
) -> Res<Vec<Row>>
where
    O: Fn() -> Fut,
    Fut: Future<Output = Res<u64>>,
    K: Fn() -> KFut,
    KFut: Future<Output = Res<()>>,
{
    let mut rows = Vec::new();
    for (w, pause) in [
        (1usize, Pause::Warm(&busy)),
        (16, Pause::Warm(&busy)),
        (256, Pause::Warm(&busy)),
        (1, Pause::Idle),
    ] {
        let idle = matches!(pause, Pause::Idle);
        let n = if w == 256 {
            plan.handoffs.max(256)
        } else {
            plan.handoffs
        };
        let (s, per, interleaved) = handoff(
            client,
            client,
            w,
            n,
            &format!("{b}-handoff-{w}-{idle}-{}", rand_tag()),
            &ops,
            probe_cost,
            pause,
        )
        .await?;
        let what = if idle {
            format!(
                "hand-off, {w} waiter, after {} ms idle (context)",
                QUEUE_PAUSE.as_millis()
            )
        } else {
            format!("hand-off, {w} waiters")
        };
        println!("{b} {what}: p50 {:.0} us p99 {:.0} us", s.p50_us, s.p99_us);
        // The idle hand-off (context) is compared with the run's warm baseline.
        let (base, base_name) = hand_off_base(interleaved, base_us, base_name);
        rows.push(Row::latency(
            b,
            &what,
            s,
            base,
            &base_name,
            if w == 1 && !idle { target } else { None },
        ));
        if !idle {
            rows.push(Row::value(
                b,
                &format!("server ops per hand-off, {w} waiters"),
                per,
                "ops",
            ));
        }
    }
    Ok(rows)
}

/// A hand-off row's baseline: the round trips timed between its own rounds when there
/// are any (a warm pause), else the run's baseline `base` named `name`.
fn hand_off_base(between: Option<f64>, base: f64, name: &str) -> (f64, String) {
    match between {
        Some(p50) => (p50, format!("{name}, between the hand-offs")),
        None => (base, name.to_owned()),
    }
}

/// CPU time used so far (user + system) by this process, every thread, and by another
/// process, read from `/proc` (Linux; in USER_HZ ticks, 100 per second by the kernel ABI).
#[derive(Clone, Copy, Debug)]
struct CpuTimes {
    this: f64,
    other: f64,
}

impl CpuTimes {
    fn read(other: u32) -> Res<Self> {
        Ok(Self {
            this: proc_cpu_secs("self")?,
            other: proc_cpu_secs(&other.to_string())?,
        })
    }

    /// Microseconds of CPU per cycle since `before`: (this process, the other).
    fn per_cycle(self, before: Self, cycles: f64) -> (f64, f64) {
        let per = |d: f64| {
            if cycles > 0.0 {
                d * 1e6 / cycles
            } else {
                f64::NAN
            }
        };
        (per(self.this - before.this), per(self.other - before.other))
    }
}

/// utime + stime of `/proc/<pid>/stat`, in seconds.
fn proc_cpu_secs(pid: &str) -> Res<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3 (state) on:
    // utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').ok_or("no ')' in /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick =
        |i: usize| -> Res<f64> { Ok(f.get(i).ok_or("short /proc stat")?.parse::<f64>()? / 100.0) };
    Ok(tick(11)? + tick(12)?)
}

/// The middle value (the upper one of an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn rand_tag() -> u32 {
    std::process::id() ^ (Instant::now().elapsed().subsec_nanos())
}

/// One PING round trip on `c`.
async fn ping_on<C: redis::aio::ConnectionLike>(mut c: C) -> Res<()> {
    redis::cmd("PING").query_async::<String>(&mut c).await?;
    Ok(())
}

async fn redis(plan: Plan) -> Res<Vec<Row>> {
    let server = blocking(|| Redis::start(false)).await?;
    let url = server.url();
    let raw = redis::Client::open(url.as_str())?;
    let conn = raw.get_multiplexed_async_connection().await?;
    let mut rows = Vec::new();
    let ping_op = || ping_on(conn.clone());
    let ping = latency(plan.samples, |_| ping_op()).await?;
    let base = ping.p50_us;
    rows.push(Row::latency(
        "redis",
        "PING (baseline)",
        ping,
        base,
        "PING",
        None,
    ));
    let c2 = conn.clone();
    let set_rate = rate(64, plan.window, move |t| {
        let mut c = c2.clone();
        async move {
            redis::cmd("SET")
                .arg(format!("raw-{t}"))
                .arg("v")
                .query_async::<()>(&mut c)
                .await?;
            Ok(())
        }
    })
    .await?;
    rows.push(Row::value(
        "redis",
        "raw SET rate (64 tasks)",
        set_rate,
        "ops/s",
    ));
    let limit = set_rate / 2.0;

    // What a server-side script costs by itself: the smallest script, same connection.
    let trivial = redis::Script::new("return 1");
    let s = latency(plan.samples, |_| {
        let (mut c, script) = (conn.clone(), trivial.clone());
        async move {
            let _: i64 = script.invoke_async(&mut c).await?;
            Ok(())
        }
    })
    .await?;
    rows.push(Row::latency(
        "redis",
        "raw EVALSHA of `return 1`",
        s,
        base,
        "PING",
        None,
    ));
    let backend = lock_redis::RedisBackend::connect(&url).await?;
    // The interleaved baseline runs on the locks' own connection.
    let bconn = backend.connection();
    let same_ping = || ping_on(bconn.clone());
    // The store's share alone: the backend's acquire and release scripts, no client
    // machinery.
    rows.push(backend_only(&backend, "redis", plan, &same_ping, PAIRED_PING).await?);
    let ours = LockClient::new(backend).with_options(opts());
    rows.push(lock_cycle("redis", &ours, plan, &same_ping, PAIRED_PING, Some(2.3)).await?);
    for tasks in [1usize, 8, 64] {
        let r = lock_rate(&ours, tasks, plan.window, "redis").await?;
        println!("redis throughput {tasks} tasks: {r:.0}/s");
        rows.push(Row::rate(
            "redis",
            &format!("throughput, {tasks} tasks"),
            r,
            limit,
            "SET rate / 2",
            None,
        ));
    }
    let s = after_idle(plan.handoffs, &same_ping).await?;
    rows.push(Row::latency(
        "redis",
        "PING after 22 ms idle (context for the 1-waiter hand-off)",
        s,
        base,
        "PING",
        None,
    ));
    let srv = server.url();
    rows.extend(
        handoffs(
            "redis",
            &ours,
            plan,
            base,
            "PING",
            Some(5.0),
            || {
                let srv = srv.clone();
                async move { redis_ops(&srv).await }
            },
            1,
            ping_op,
        )
        .await?,
    );

    // The peer: rslock 0.10 at its defaults, same server.
    let rl = Arc::new(rslock::LockManager::new(vec![url.clone()]));
    let ttl = Duration::from_secs(10);
    let (s, paired_base) = paired(plan.samples, &ping_op, |_| {
        let rl = rl.clone();
        async move {
            let l = rl
                .lock("rslock-ar", ttl)
                .await
                .map_err(|e| format!("{e:?}"))?;
            rl.unlock(&l).await;
            Ok(())
        }
    })
    .await?;
    rows.push(Row::latency(
        "rslock 0.10",
        "acquire + release",
        s,
        paired_base,
        "PING, interleaved",
        None,
    ));
    // The comparison alternates windows, ours then rslock's, three of each, and divides
    // the medians: a machine whose speed drifts over the run moves both alike.
    let peer_rate = |window: Duration| {
        let rl = rl.clone();
        rate(64, window, move |t| {
            let rl = rl.clone();
            async move {
                let l = rl
                    .acquire_no_guard(format!("rslock-tp-{t}").as_str(), ttl)
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                rl.unlock(&l).await;
                Ok(())
            }
        })
    };
    // CPU time per cycle, of this process (the client, every thread) and of the server,
    // read around each window: on a machine where client and server share the cores, the
    // rate follows their sum; on a server of its own, each side's share.
    let server_pid = server.proc.pid().ok_or("redis-server has no pid")?;
    let (mut ours_w, mut peer_w) = (Vec::new(), Vec::new());
    let (mut ours_cpu, mut peer_cpu) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let before = CpuTimes::read(server_pid)?;
        let r = lock_rate(&ours, 64, plan.window, "redis-vs").await?;
        ours_cpu.push(CpuTimes::read(server_pid)?.per_cycle(before, r * plan.window.as_secs_f64()));
        ours_w.push(r);
        let before = CpuTimes::read(server_pid)?;
        let r = peer_rate(plan.window).await?;
        peer_cpu.push(CpuTimes::read(server_pid)?.per_cycle(before, r * plan.window.as_secs_f64()));
        peer_w.push(r);
    }
    println!("redis 64 tasks, alternated windows: ours {ours_w:.0?}/s, rslock {peer_w:.0?}/s");
    println!("redis CPU µs per cycle (client, server): ours {ours_cpu:.1?}, rslock {peer_cpu:.1?}");
    let (ours_mid, peer_64) = (median(ours_w), median(peer_w));
    // Named like the other backends' rows, so the chart shows it beside them.
    rows.push(Row::rate(
        "rslock 0.10",
        "throughput, 64 tasks",
        peer_64,
        limit,
        "SET rate / 2 (median of 3 windows)",
        None,
    ));
    rows.push(Row::compare(
        "redis",
        "throughput, 64 tasks vs rslock (medians of 3 alternated windows)",
        ours_mid,
        peer_64,
        "rslock 0.10",
        1.5,
    ));
    for (who, cpu) in [("redis", ours_cpu), ("rslock 0.10", peer_cpu)] {
        let (client, server) = cpu.into_iter().unzip();
        for (side, v) in [("client process", client), ("redis-server", server)] {
            rows.push(Row::value(
                who,
                &format!("CPU per cycle at 64 tasks: {side} (median of 3 windows)"),
                median(v),
                "µs",
            ));
        }
    }
    let peer_handoff = rslock_handoff(&rl, 16, plan.handoffs.min(100)).await?;
    rows.push(Row::latency(
        "rslock 0.10",
        "hand-off, 16 waiters",
        peer_handoff,
        base,
        "PING",
        None,
    ));
    drop(server);
    Ok(rows)
}

async fn redis_ops(url: &str) -> Res<u64> {
    let c = redis::Client::open(url)?;
    let mut conn = c.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await?;
    let n = info
        .lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or("no total_commands_processed in INFO")?;
    Ok(n)
}

async fn rslock_handoff(
    rl: &Arc<rslock::LockManager>,
    waiters: usize,
    handoffs: usize,
) -> Res<Stats> {
    let ttl = Duration::from_secs(10);
    let key = format!("rslock-handoff-{}", rand_tag());
    let first = rl
        .acquire_no_guard(key.as_str(), ttl)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let clock = Arc::new(HandoffClock::default());
    let count = Arc::new(AtomicUsize::new(0));
    let mut hs = Vec::new();
    for _ in 0..waiters {
        let (rl, key) = (rl.clone(), key.clone());
        let (clock, count) = (clock.clone(), count.clone());
        hs.push(tokio::spawn(async move {
            loop {
                let l = rl
                    .acquire_no_guard(key.as_str(), ttl)
                    .await
                    .map_err(|e| -> BoxErr { format!("{e:?}").into() })?;
                clock.granted();
                let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                clock.releasing();
                rl.unlock(&l).await;
                if n >= handoffs {
                    return Ok::<_, BoxErr>(());
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    clock.releasing();
    rl.unlock(&first).await;
    for h in hs {
        h.await??;
    }
    Ok(stats(clock.take()))
}

async fn pg(plan: Plan) -> Res<Vec<Row>> {
    let server =
        blocking(|| Postgres::start_with(&["shared_preload_libraries=pg_stat_statements"])).await?;
    let url = server.url();
    let (raw, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    raw.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await?;
    let raw = Arc::new(raw);
    let mut rows = Vec::new();
    let one = raw.prepare("SELECT 1").await?;
    let select_op = || {
        let (raw, one) = (raw.clone(), one.clone());
        async move {
            raw.query_one(&one, &[]).await?;
            Ok(())
        }
    };
    let s = latency(plan.samples, |_| select_op()).await?;
    let base = s.p50_us;
    rows.push(Row::latency(
        "pg",
        "SELECT 1 (baseline)",
        s,
        base,
        "SELECT 1",
        None,
    ));
    let lock = raw.prepare("SELECT pg_advisory_lock($1)").await?;
    let unlock = raw.prepare("SELECT pg_advisory_unlock($1)").await?;
    let s = latency(plan.samples, |_| {
        let (raw, lock, unlock) = (raw.clone(), lock.clone(), unlock.clone());
        async move {
            raw.query_one(&lock, &[&42i64]).await?;
            raw.query_one(&unlock, &[&42i64]).await?;
            Ok(())
        }
    })
    .await?;
    rows.push(Row::latency(
        "pg",
        "raw pg_advisory_lock + unlock (limit)",
        s,
        base,
        "SELECT 1",
        None,
    ));
    let (raw2, one2) = (raw.clone(), one.clone());
    let select_rate = rate(1, plan.window, move |_| {
        let (raw, one) = (raw2.clone(), one2.clone());
        async move {
            raw.query_one(&one, &[]).await?;
            Ok(())
        }
    })
    .await?;
    let locks = lock_pg::PgLocks::connect_with(lock_pg::PgConfig::new(&url).pool_size(80)).await?;
    let ops = || {
        let raw = raw.clone();
        async move {
            let r = raw
                .query_one(
                    "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements",
                    &[],
                )
                .await?;
            Ok(u64::try_from(r.get::<_, i64>(0)).unwrap_or(0))
        }
    };
    // The interleaved baseline runs on the locks' own pool (most recently used first, so
    // on the same connection as the lock cycle that follows it).
    let pool = locks.pool().clone();
    let pooled_select = || {
        let pool = pool.clone();
        async move {
            let c = pool.get().await?;
            let st = c.prepare_cached("SELECT 1").await?;
            c.query_one(&st, &[]).await?;
            Ok(())
        }
    };
    // The store's share alone: the advisory backend's acquire and release, no client
    // machinery.
    rows.push(
        backend_only(
            &locks.advisory(),
            "pg advisory",
            plan,
            &pooled_select,
            PAIRED_SELECT,
        )
        .await?,
    );
    for (mode, client, target) in [
        ("pg advisory", LockClient::new(locks.advisory()), 2.3),
        ("pg lease", LockClient::new(locks.lease_rows()), 3.0),
        ("pg xact", LockClient::new(locks.transactional()), 2.3),
    ] {
        let client = client.with_options(opts());
        rows.push(
            lock_cycle(
                mode,
                &client,
                plan,
                &pooled_select,
                PAIRED_SELECT,
                Some(target),
            )
            .await?,
        );
        for tasks in [1usize, 8, 32, 64] {
            let r = lock_rate(&client, tasks, plan.window, mode.replace(' ', "-").as_str()).await?;
            rows.push(Row::rate(
                mode,
                &format!("throughput, {tasks} tasks"),
                r,
                select_rate / 2.0,
                "SELECT 1 rate / 2 (1 connection)",
                None,
            ));
        }
        rows.extend(
            handoffs(
                mode,
                &client,
                plan,
                base,
                "SELECT 1",
                Some(5.0),
                ops,
                1,
                select_op,
            )
            .await?,
        );
        if mode == "pg lease" {
            // The rows above have holder and waiters in one client, which wakes its own
            // waiter when it releases. A waiter in another client (its own pool and
            // listener, as in another process) learns of the release from the server's
            // NOTIFY.
            let other = lock_pg::PgLocks::connect_with(lock_pg::PgConfig::new(&url)).await?;
            let other = LockClient::new(other.lease_rows()).with_options(opts());
            let key = format!("pg-lease-handoff-other-{}", rand_tag());
            let (s, _, between) = handoff(
                &client,
                &other,
                1,
                plan.handoffs,
                &key,
                &ops,
                1,
                Pause::Warm(&select_op),
            )
            .await?;
            let (base, base_name) = hand_off_base(between, base, "SELECT 1");
            rows.push(Row::latency(
                mode,
                "hand-off, 1 waiter in another client (NOTIFY)",
                s,
                base,
                &base_name,
                None,
            ));
        }
    }
    // Measured last: after the idle pauses the machine answers slower for a while, which
    // would tilt whichever row came next.
    let s = after_idle(plan.handoffs, &pooled_select).await?;
    rows.push(Row::latency(
        "pg",
        "SELECT 1 after 22 ms idle (context for the 1-waiter hand-offs)",
        s,
        base,
        "SELECT 1",
        None,
    ));
    drop(server);
    Ok(rows)
}

/// A lock cycle (acquire + release through `client`), each right after one `base` round
/// trip (see [`paired`]); the row's ratio is to `base`, described by `to`.
async fn lock_cycle<B, BFut>(
    who: &str,
    client: &LockClient,
    plan: Plan,
    base: &B,
    to: &str,
    target: Option<f64>,
) -> Res<Row>
where
    B: Fn() -> BFut,
    BFut: Future<Output = Res<()>>,
{
    let (s, paired_base) = paired(plan.samples, base, |_| {
        let c = client.clone();
        async move {
            c.acquire("ar").await?.release().await?;
            Ok(())
        }
    })
    .await?;
    println!(
        "{who} acquire+release p50 {:.0} us ({:.2} x {to})",
        s.p50_us,
        s.p50_us / paired_base
    );
    Ok(Row::latency(
        who,
        "acquire + release",
        s,
        paired_base,
        to,
        target,
    ))
}

/// The PostgreSQL lock cycles on a server that flushes its WAL (`fsync=on`, as in
/// production). The other PostgreSQL rows run with `fsync=off`, where a commit costs no
/// disk flush: here every synchronous commit waits for one. Context, not a target.
async fn pg_durable(plan: Plan) -> Res<Vec<Row>> {
    let server = blocking(|| Postgres::start_with(&["fsync=on"])).await?;
    let url = server.url();
    let locks = lock_pg::PgLocks::connect_with(lock_pg::PgConfig::new(&url).pool_size(8)).await?;
    let pool = locks.pool().clone();
    let pooled = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            let c = pool.get().await?;
            let st = c.prepare_cached(sql).await?;
            c.execute(&st, &[]).await?;
            Ok(())
        }
    };
    pool.get()
        .await?
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS bench_one (n bigint); \
             INSERT INTO bench_one SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM bench_one)",
        )
        .await?;
    let select = || pooled("SELECT 1");
    let mut rows = Vec::new();
    let base = latency(plan.samples, |_| select()).await?.p50_us;
    let (s, paired_base) = paired(plan.samples, &select, |_| {
        pooled("UPDATE bench_one SET n = n + 1")
    })
    .await?;
    rows.push(Row::latency(
        "pg, fsync on",
        "one-row UPDATE, committed with a WAL flush",
        s,
        paired_base,
        PAIRED_SELECT,
        None,
    ));
    for (mode, client) in [
        ("pg advisory, fsync on", LockClient::new(locks.advisory())),
        ("pg lease, fsync on", LockClient::new(locks.lease_rows())),
        ("pg xact, fsync on", LockClient::new(locks.transactional())),
    ] {
        let client = client.with_options(opts());
        rows.push(lock_cycle(mode, &client, plan, &select, PAIRED_SELECT, None).await?);
        let no_ops = || async { Ok(0u64) };
        let (s, _, between) = handoff(
            &client,
            &client,
            1,
            plan.handoffs,
            &format!("durable-handoff-{}", rand_tag()),
            &no_ops,
            0,
            Pause::Warm(&select),
        )
        .await?;
        let (base, base_name) = hand_off_base(between, base, "SELECT 1");
        rows.push(Row::latency(
            mode,
            "hand-off, 1 waiter",
            s,
            base,
            &base_name,
            None,
        ));
    }
    drop(server);
    Ok(rows)
}

/// DynamoDB's API as moto emulates it (no DynamoDB is reachable here): the figures say how
/// many round trips a cycle costs against a raw `GetItem`, not how fast DynamoDB is.
async fn dynamo(plan: Plan) -> Res<Vec<Row>> {
    use lock_dynamo::aws_sdk_dynamodb::types::AttributeValue;
    let moto = blocking(lock_tests::servers::Moto::start).await?;
    let cfg = lock_tests::targets::dynamo_config(&moto.url(), "bench-locks");
    let backend = lock_dynamo::DynamoBackend::connect_with(cfg).await?;
    let sdk = backend.client().clone();
    let get = || {
        let sdk = sdk.clone();
        async move {
            sdk.get_item()
                .table_name("bench-locks")
                .key("key", AttributeValue::S("baseline".into()))
                .consistent_read(true)
                .send()
                .await?;
            Ok(())
        }
    };
    let s = latency(plan.samples, |_| get()).await?;
    let mut rows = vec![Row::latency(
        "dynamo (moto)",
        "GetItem (baseline)",
        s,
        s.p50_us,
        "GetItem",
        None,
    )];
    let client = LockClient::new(backend).with_options(opts());
    rows.push(
        lock_cycle(
            "dynamo (moto)",
            &client,
            plan,
            &get,
            "GetItem, interleaved",
            None,
        )
        .await?,
    );
    drop(moto);
    Ok(rows)
}

async fn zk(plan: Plan) -> Res<Vec<Row>> {
    use lock_zk::zookeeper_client as zkc;
    let server = Arc::new(blocking(|| ZooKeeper::start(1)).await?);
    let connect = server.connect_string();
    let raw = zkc::Client::connect(&connect).await?;
    let mut rows = Vec::new();
    let exists_op = || {
        let raw = raw.clone();
        async move {
            raw.check_stat("/").await?;
            Ok(())
        }
    };
    let s = latency(plan.samples, |_| exists_op()).await?;
    rows.push(Row::latency(
        "zk",
        "exists (baseline)",
        s,
        s.p50_us,
        "exists",
        None,
    ));
    let base = s.p50_us;
    let opts_dir = zkc::CreateMode::Persistent.with_acls(zkc::Acls::anyone_all());
    let _ = raw.create("/raw", &[], &opts_dir).await;
    let seq = zkc::CreateMode::EphemeralSequential.with_acls(zkc::Acls::anyone_all());
    let raw_op = || {
        let (raw, seq) = (raw.clone(), seq.clone());
        async move {
            let (_, n) = raw.create("/raw/n-", b"", &seq).await?;
            raw.list_children("/raw").await?;
            raw.delete(&format!("/raw/n-{n}"), None).await?;
            Ok(())
        }
    };
    let raw_cycle = latency(plan.samples, |_| raw_op()).await?;
    rows.push(Row::latency(
        "zk",
        "raw create + list + delete (limit)",
        raw_cycle,
        base,
        "exists",
        None,
    ));
    let backend = lock_zk::ZkBackend::connect(&connect).await?;
    let client = LockClient::new(backend).with_options(opts());
    rows.push(
        lock_cycle(
            "zk",
            &client,
            plan,
            &raw_op,
            "raw create+list+delete, interleaved",
            Some(1.5),
        )
        .await?,
    );
    for tasks in [1usize, 8, 64] {
        // The limit: the same three operations, raw, each task under a parent of its own.
        let (raw2, dir, seq2) = (raw.clone(), opts_dir.clone(), seq.clone());
        for t in 0..tasks {
            let _ = raw2.create(&format!("/raw-{t}"), &[], &dir).await;
        }
        let limit = rate(tasks, plan.window, move |t| {
            let (raw, seq) = (raw2.clone(), seq2.clone());
            async move {
                let parent = format!("/raw-{t}");
                let (_, n) = raw.create(&format!("{parent}/n-"), b"", &seq).await?;
                raw.list_children(&parent).await?;
                raw.delete(&format!("{parent}/n-{n}"), None).await?;
                Ok(())
            }
        })
        .await?;
        let r = lock_rate(&client, tasks, plan.window, "zk").await?;
        rows.push(Row::rate(
            "zk",
            &format!("throughput, {tasks} tasks"),
            r,
            limit,
            "raw create+list+delete rate",
            None,
        ));
    }
    let srv = server.clone();
    rows.extend(
        handoffs(
            "zk",
            &client,
            plan,
            base,
            "exists",
            None,
            || {
                let srv = srv.clone();
                async move {
                    let m = tokio::task::spawn_blocking(move || srv.four_letter(0, "mntr"))
                        .await?
                        .ok_or("no mntr reply")?;
                    let n = m
                        .lines()
                        .find_map(|l| l.strip_prefix("zk_packets_received"))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .ok_or("no zk_packets_received in mntr")?;
                    Ok(n)
                }
            },
            0,
            exists_op,
        )
        .await?,
    );
    Ok(rows)
}
