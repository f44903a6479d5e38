//! The `distlock` command against a real Redis server: runs never overlap, busy and timeout
//! exit codes, a holder cut off from the store has its command stopped before the lease
//! ends, signals reach the command, bad input writes nothing.

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use lock_conformance::proxy::Proxy;
use tokio::process::Command;
use tokio::time::{sleep, Instant};

use crate::servers::{temp_dir, Redis};

type Res<T> = Result<T, String>;

fn e2s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The `distlock` binary beside the running one (`cargo build -p distlock`), or
/// `LOCK_DISTLOCK`.
fn exe() -> Res<PathBuf> {
    let path = std::env::var_os("LOCK_DISTLOCK")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::current_exe()
                .ok()?
                .parent()
                .map(|d| d.join("distlock"))
        })
        .ok_or("cannot tell where distlock is")?;
    path.exists().then_some(path.clone()).ok_or(format!(
        "{} not found: build it with `cargo build -p distlock`",
        path.display()
    ))
}

fn distlock(args: &[&str]) -> Res<Command> {
    let mut c = Command::new(exe()?);
    c.args(args)
        .env_remove("DISTLOCK_STORE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    Ok(c)
}

async fn server() -> Res<Redis> {
    tokio::task::spawn_blocking(|| Redis::start(false))
        .await
        .map_err(e2s)?
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Four runs at once, each appending start and end marks with its token: the marks never
/// interleave and the tokens rise.
pub(crate) async fn runs_never_overlap() -> Res<String> {
    let redis = server().await?;
    overlap(&redis.url(), &[]).await
}

/// The same through a Redlock of three servers, with a `max_lease` of 2 s (a node new to the
/// lock sits out that long); a `--lease` above it is refused with the usage code before
/// anything is written.
pub(crate) async fn redlock_runs_never_overlap() -> Res<String> {
    let nodes = [server().await?, server().await?, server().await?];
    let hosts: Vec<String> = nodes
        .iter()
        .map(|n| n.url().trim_start_matches("redis://").to_owned())
        .collect();
    let url = format!("redlock://{}?max_lease=2s", hosts.join(","));
    let o = distlock(&["run", "--store", &url, "--lease", "5s", "job", "--", "true"])?
        .output()
        .await
        .map_err(e2s)?;
    let err = String::from_utf8_lossy(&o.stderr).trim().to_owned();
    if code(&o) != 64 || !err.contains("max_lease") {
        return Err(format!(
            "--lease 5s over max_lease 2s: exit {}, {err:?}",
            code(&o)
        ));
    }
    for n in &nodes {
        let keys = dbsize(&n.url()).await?;
        if keys != 0 {
            return Err(format!("{keys} keys written by a refused --lease"));
        }
    }
    let runs = overlap(&url, &["--lease", "1s"]).await?;
    Ok(format!("--lease 5s: {err}; {runs}"))
}

/// `rediss://` to a server a private CA vouches for, which asks for client certificates:
/// with `--tls-ca`, `--tls-cert` and `--tls-key` the command runs with its token; with
/// another CA, or without a client certificate, the usage code and one line.
pub(crate) async fn rediss_with_a_private_ca() -> Res<String> {
    let pki = crate::tls::Pki::new()?;
    let (_server, port) = crate::redis_net::tls_server(&pki).await?;
    let url = format!("rediss://localhost:{port}");
    let file = |f: &PathBuf| f.display().to_string();
    let (ca, other_ca) = (file(&pki.ca.cert_file), file(&pki.other_ca.cert_file));
    let (cert, key) = (file(&pki.client.cert_file), file(&pki.client.key_file));
    let run = |tls: Vec<&str>| {
        let mut args = vec!["run", "--store", &url, "--no-wait"];
        args.extend(tls);
        args.extend(["job", "--", "sh", "-c", "echo token=$DISTLOCK_TOKEN"]);
        distlock(&args)
    };
    let o = run(vec![
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ])?
    .output()
    .await
    .map_err(e2s)?;
    let out = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    if code(&o) != 0 || !out.starts_with("token=") {
        return Err(format!(
            "with the CA and a client certificate: exit {}, {out:?}, {:?}",
            code(&o),
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    let mut refused = Vec::new();
    for (what, tls) in [
        (
            "another CA",
            vec![
                "--tls-ca",
                &other_ca,
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
            ],
        ),
        ("no client certificate", vec!["--tls-ca", &ca]),
    ] {
        let o = run(tls)?.output().await.map_err(e2s)?;
        let err = String::from_utf8_lossy(&o.stderr).trim().to_owned();
        if code(&o) != 64 || err.lines().count() != 1 || !err.contains("TLS") {
            return Err(format!("{what}: exit {}, {err:?}", code(&o)));
        }
        refused.push(format!("{what}: {err}"));
    }
    Ok(format!("{out} over TLS; {}", refused.join("; ")))
}

/// Four runs at once on `url` (with `extra` options), each appending start and end marks
/// with its token: the marks never interleave and the tokens rise.
async fn overlap(url: &str, extra: &[&str]) -> Res<String> {
    let marks = temp_dir("distlock")?.join("marks");
    let script = format!(
        "echo \"start $DISTLOCK_TOKEN\" >> {f}; sleep 0.2; echo \"end $DISTLOCK_TOKEN\" >> {f}",
        f = marks.display()
    );
    let mut runs = Vec::new();
    for _ in 0..4 {
        let mut args = vec!["run", "--store", url, "--wait", "30s"];
        args.extend(extra);
        args.extend(["job", "--", "sh", "-c", &script]);
        let mut c = distlock(&args)?;
        runs.push(c.spawn().map_err(e2s)?);
    }
    for r in runs {
        let o = r.wait_with_output().await.map_err(e2s)?;
        if code(&o) != 0 {
            return Err(format!(
                "a run exited {}: {}",
                code(&o),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
    }
    let text = std::fs::read_to_string(&marks).map_err(e2s)?;
    let lines: Vec<&str> = text.lines().collect();
    let mut last = 0u64;
    for pair in lines.chunks(2) {
        let (Some(s), Some(e)) = (pair.first(), pair.get(1)) else {
            return Err(format!("an odd number of marks: {lines:?}"));
        };
        let t = s.strip_prefix("start ").and_then(|t| t.parse::<u64>().ok());
        match t {
            Some(t) if *e == format!("end {t}") && t > last => last = t,
            _ => return Err(format!("interleaved or falling marks: {lines:?}")),
        }
    }
    if lines.len() != 8 {
        return Err(format!("{} marks, expected 8", lines.len()));
    }
    Ok(format!(
        "4 runs, marks in pairs with rising tokens: {lines:?}"
    ))
}

/// A held key: `--no-wait` exits 75 at once, `--wait 1s` exits 124 after the second, and
/// `--conflict-exit-code` replaces either.
pub(crate) async fn busy_and_timeout_codes() -> Res<String> {
    let redis = server().await?;
    let url = redis.url();
    let mut holder = distlock(&["run", "--store", &url, "job", "--", "sleep", "5"])?
        .spawn()
        .map_err(e2s)?;
    sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    let busy = distlock(&["run", "--store", &url, "--no-wait", "job", "--", "true"])?
        .output()
        .await
        .map_err(e2s)?;
    let busy_took = t.elapsed();
    let t = Instant::now();
    let timed = distlock(&["run", "--store", &url, "--wait", "1s", "job", "--", "true"])?
        .output()
        .await
        .map_err(e2s)?;
    let timed_took = t.elapsed();
    let mut chosen = Vec::new();
    for args in [
        ["-E", "3", "--no-wait"],
        ["--conflict-exit-code=4", "--wait", "300ms"],
    ] {
        let mut all = vec!["run", "--store", &url];
        all.extend(args);
        all.extend(["job", "--", "true"]);
        chosen.push(code(&distlock(&all)?.output().await.map_err(e2s)?));
    }
    let _ = holder.kill().await;
    if chosen != [3, 4] {
        return Err(format!("-E 3 and --conflict-exit-code=4: exits {chosen:?}"));
    }
    if code(&busy) != 75 || busy_took > Duration::from_secs(2) {
        return Err(format!(
            "--no-wait: exit {} after {busy_took:?}",
            code(&busy)
        ));
    }
    if code(&timed) != 124 || timed_took < Duration::from_secs(1) {
        return Err(format!(
            "--wait 1s: exit {} after {timed_took:?}",
            code(&timed)
        ));
    }
    Ok(format!(
        "--no-wait: 75 after {busy_took:?}; --wait 1s: 124 after {timed_took:?}; -E: {chosen:?}"
    ))
}

fn alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// A holder whose connection to the store is cut: its command, which ignores SIGTERM, is
/// killed, and `distlock` exits 76, before the lease can end on the store (read from the
/// server directly at the cut).
pub(crate) async fn cut_holder_stops_its_command_in_time() -> Res<String> {
    let redis = server().await?;
    let proxy = Proxy::start(redis.addr()).await.map_err(e2s)?;
    let via = format!("redis://{}", proxy.addr());
    let dir = temp_dir("distlock")?;
    let pidfile = dir.join("pid");
    // A command that ignores SIGTERM: only the SIGKILL by the lock's deadline stops it.
    let script = format!(
        "trap '' TERM; echo $$ > {}; while true; do sleep 0.1; done",
        pidfile.display()
    );
    let mut run = distlock(&[
        "run",
        "--store",
        &via,
        "--lease",
        "6s",
        "--kill-after",
        "30s",
        "job",
        "--",
        "sh",
        "-c",
        &script,
    ])?
    .spawn()
    .map_err(e2s)?;
    let t = Instant::now();
    let pid = loop {
        if let Some(p) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            break p;
        }
        if t.elapsed() > Duration::from_secs(10) {
            return Err("the command never started".into());
        }
        sleep(Duration::from_millis(20)).await;
    };
    sleep(Duration::from_millis(300)).await;
    proxy.set_cut(true);
    let cut = Instant::now();
    // The lease left on the server, by its own clock, read around the proxy.
    let client = lock_redis::redis::Client::open(redis.url()).map_err(e2s)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(e2s)?;
    let keys: Vec<String> = lock_redis::redis::cmd("KEYS")
        .arg("*job*")
        .query_async(&mut conn)
        .await
        .map_err(e2s)?;
    let mut left_ms = i64::MAX;
    for k in &keys {
        let pttl: i64 = lock_redis::redis::cmd("PTTL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .map_err(e2s)?;
        if pttl > 0 {
            left_ms = left_ms.min(pttl);
        }
    }
    if left_ms == i64::MAX {
        return Err(format!("no lease on the server among {keys:?}"));
    }
    let ends = cut + Duration::from_millis(u64::try_from(left_ms).unwrap_or(0));
    let mut stopped = None;
    while cut.elapsed() < Duration::from_secs(20) {
        if !alive(pid) {
            stopped = Some(Instant::now());
            break;
        }
        sleep(Duration::from_millis(10)).await;
    }
    let out = tokio::time::timeout(Duration::from_secs(20), run.wait())
        .await
        .map_err(|_| "distlock did not exit within 20 s of the cut".to_owned())?
        .map_err(e2s)?;
    let Some(stopped) = stopped else {
        let _ = crate::servers::signal(u32::try_from(pid).unwrap_or(0), "KILL");
        return Err("the command was still running 20 s after the cut".into());
    };
    if out.code() != Some(76) || stopped > ends {
        return Err(format!(
            "exit {:?}; the command stopped {:?} after the cut, the lease ended {left_ms} ms after it",
            out.code(),
            stopped - cut
        ));
    }
    Ok(format!(
        "the command stopped {:?} after the cut, the server's lease had {left_ms} ms left; exit 76",
        stopped - cut
    ))
}

/// SIGINT to `distlock` reaches the command (which traps it and exits 7); the lock is
/// released, nothing is left.
pub(crate) async fn sigint_reaches_the_command() -> Res<String> {
    let redis = server().await?;
    let url = redis.url();
    let marks = temp_dir("distlock")?.join("marks");
    let script = format!(
        "trap 'echo got-int >> {f}; exit 7' INT; echo ready >> {f}; while true; do sleep 0.05; done",
        f = marks.display()
    );
    let run = distlock(&["run", "--store", &url, "job", "--", "sh", "-c", &script])?
        .spawn()
        .map_err(e2s)?;
    let pid = run.id().ok_or("no pid")?;
    let t = Instant::now();
    while !std::fs::read_to_string(&marks)
        .unwrap_or_default()
        .contains("ready")
    {
        if t.elapsed() > Duration::from_secs(10) {
            return Err("the command never started".into());
        }
        sleep(Duration::from_millis(20)).await;
    }
    crate::servers::signal(pid, "INT")?;
    let out = tokio::time::timeout(Duration::from_secs(10), run.wait_with_output())
        .await
        .map_err(|_| "distlock did not exit after SIGINT".to_owned())?
        .map_err(e2s)?;
    let seen = std::fs::read_to_string(&marks).unwrap_or_default();
    let after = distlock(&["inspect", "--store", &url, "job"])?
        .output()
        .await
        .map_err(e2s)?;
    let after = String::from_utf8_lossy(&after.stdout).trim().to_owned();
    if code(&out) != 7 || !seen.contains("got-int") || after != "job: free" {
        return Err(format!(
            "exit {}, marks {seen:?}, then inspect: {after:?}",
            code(&out)
        ));
    }
    Ok(format!(
        "the command trapped SIGINT and exited 7; then {after:?}"
    ))
}

/// Bad input: each gives its exit code and one line on stderr, and writes nothing.
pub(crate) async fn bad_input_codes_and_nothing_written() -> Res<String> {
    let redis = server().await?;
    let url = redis.url();
    let cases: [(&[&str], i32); 10] = [
        (
            &[
                "run",
                "--store=redlock://:n0t-the-pw-7?x=1@127.0.0.1:1,127.0.0.1:2,127.0.0.1:3",
                "job",
                "--",
                "true",
            ],
            64,
        ),
        (
            &[
                "run",
                "--store=redlock://127.0.0.1:1,127.0.0.1:2,127.0.0.1:3?max_lease=0s",
                "job",
                "--",
                "true",
            ],
            64,
        ),
        (
            &[
                "run",
                "--store=redis://app:n0t-the-pw-7@127.0.0.1:1",
                "job",
                "--",
                "true",
            ],
            69,
        ),
        (
            &[
                "run",
                "--stor=redis://app:n0t-the-pw-7@h",
                "job",
                "--",
                "true",
            ],
            64,
        ),
        (&["run", "--store", "bogus://x", "job", "--", "true"], 64),
        (&["run", "--store", &url, "", "--", "true"], 64),
        (
            &["run", "--store", &url, "--lease", "5x", "job", "--", "true"],
            64,
        ),
        (&["run", "--store", &url, "job"], 64),
        (
            &["run", "--store", &url, "--frobnicate", "job", "--", "true"],
            64,
        ),
        (
            &["run", "--store", "redis://127.0.0.1:1", "job", "--", "true"],
            69,
        ),
    ];
    let mut seen = Vec::new();
    for (args, want) in cases {
        let o = distlock(args)?.output().await.map_err(e2s)?;
        let err = String::from_utf8_lossy(&o.stderr).trim().to_owned();
        if code(&o) != want
            || err.lines().count() != 1
            || !err.starts_with("distlock: ")
            || err.contains("n0t-the-pw-7")
        {
            return Err(format!(
                "{args:?}: exit {} (want {want}), stderr {err:?}",
                code(&o)
            ));
        }
        seen.push(format!("{want}: {err}"));
    }
    let keys = dbsize(&url).await?;
    if keys != 0 {
        return Err(format!("{keys} keys written by bad input"));
    }
    // Credentials the server refuses: the usage code, and the password not shown.
    let client = lock_redis::redis::Client::open(url.as_str()).map_err(e2s)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(e2s)?;
    lock_redis::redis::cmd("CONFIG")
        .arg(&["SET", "requirepass", "s3cret"])
        .query_async::<()>(&mut conn)
        .await
        .map_err(e2s)?;
    let wrong = url.replace("redis://", "redis://:wr0ng-pw@");
    let o = distlock(&["run", "--store", &wrong, "job", "--", "true"])?
        .output()
        .await
        .map_err(e2s)?;
    let err = String::from_utf8_lossy(&o.stderr).trim().to_owned();
    if code(&o) != 64 || err.lines().count() != 1 || err.contains("wr0ng-pw") {
        return Err(format!(
            "a wrong password: exit {}, stderr {err:?}",
            code(&o)
        ));
    }
    seen.push(format!("64: {err}"));
    Ok(seen.join("; "))
}

/// How many keys the server at `url` holds.
async fn dbsize(url: &str) -> Res<i64> {
    let client = lock_redis::redis::Client::open(url).map_err(e2s)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(e2s)?;
    lock_redis::redis::cmd("DBSIZE")
        .query_async(&mut conn)
        .await
        .map_err(e2s)
}

/// `distlock` on `store`: a command runs under the lock with its token, and the key is free
/// afterwards (`env`: what the store's client needs, such as test credentials).
pub async fn smoke(store: String, env: &[(&str, &str)]) -> Res<String> {
    let key = format!("distlock-smoke-{:08x}", rand::random::<u32>());
    let mut run = distlock(&[
        "run", "--store", &store, "--wait", "10s", &key, "--", "sh", "-c",
    ])?;
    run.arg("echo token=$DISTLOCK_TOKEN")
        .envs(env.iter().copied());
    let o = run.output().await.map_err(e2s)?;
    let out = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let token = out
        .strip_prefix("token=")
        .and_then(|t| t.parse::<u64>().ok());
    if code(&o) != 0 || token.is_none() {
        return Err(format!(
            "exit {}, output {out:?}, stderr {:?}",
            code(&o),
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    let mut inspect = distlock(&["inspect", "--json", "--store", &store, &key])?;
    inspect.envs(env.iter().copied());
    let after = inspect.output().await.map_err(e2s)?;
    let after = String::from_utf8_lossy(&after.stdout).trim().to_owned();
    if !after.contains("\"held\":false") {
        return Err(format!("after the run, inspect says {after}"));
    }
    Ok(format!(
        "the command ran with token {}; then {after}",
        token.unwrap_or(0)
    ))
}
