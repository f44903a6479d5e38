#![doc = include_str!("../README.md")]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod store;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use lock_core::{
    HolderMeta, LeaseId, LeaseRef, LockBackend, LockClient, LockError, LockKey, LockOptions,
    LockStatus, ReleaseOutcome, WaitPolicy,
};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

use crate::store::{StoreOpts, Tls};

/// Bad usage or configuration (a bad URL, key, duration, option or credentials).
const EXIT_USAGE: u8 = 64;
/// The store could not be reached (or failed) before the lock was taken.
const EXIT_UNREACHABLE: u8 = 69;
/// Not acquired: the key is held and `--no-wait` was given.
const EXIT_BUSY: u8 = 75;
/// The lock was lost (or could no longer be confirmed) while the command ran.
const EXIT_LOST: u8 = 76;
/// The lease when `--lease` is not given.
const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Not acquired within `--wait`.
const EXIT_TIMEOUT: u8 = 124;
/// The command could not be run (not executable).
const EXIT_CANNOT_RUN: u8 = 126;
/// The command was not found.
const EXIT_NOT_FOUND: u8 = 127;

const USAGE: &str = "\
distlock: run a command under a distributed lock

USAGE:
  distlock run [OPTIONS] KEY -- COMMAND [ARGS...]
  distlock inspect [OPTIONS] [--json] KEY
  distlock release [OPTIONS] --force --lease-id ID KEY

STORE (--store URL, or DISTLOCK_STORE):
  redis://[user:pass@]host:6379    rediss://... (TLS)
  redlock://[user:pass@]h1:6379,h2:6379,h3:6379[?max_lease=60s]    redlock+tls://...
  postgres://user:pass@host/db[?sslmode=verify-full]    (--pg-mode advisory|lease|xact)
  zk://[user:pass@]h1:2181,h2:2181[/chroot]    zk+tls://...  (user:pass: digest auth)
  mongodb://... mongodb+srv://...
  dynamodb://TABLE[?region=R&endpoint=URL&create=true]

OPTIONS:
  --store URL          the store (default: $DISTLOCK_STORE)
  --lease DUR          lease, renewed while the command runs (default 30s)
  --wait DUR           wait at most this long for the lock (default: forever; also
                       --wait forever)
  --no-wait            fail at once if the key is held
  -E, --conflict-exit-code N
                       exit N instead of 75 or 124 when the lock was not acquired
  --label TEXT         holder label, shown by inspect
  --kill-after DUR     grace between SIGTERM and SIGKILL when the lock is lost (default
                       5s; never past the lock's safe deadline)
  --tls-ca FILE        CA certificates (PEM) for rediss://, postgres://, zk+tls://
  --tls-cert FILE      client certificate (PEM), with --tls-key FILE
  --pg-mode MODE       advisory (default), lease or xact

The command runs with DISTLOCK_KEY, DISTLOCK_TOKEN (the fencing token: pass it to every
write) and DISTLOCK_LEASE_ID in its environment, in a process group of its own; INT, TERM
and HUP are passed on to it. If the lock turns uncertain or is lost, the command gets
SIGTERM at once and SIGKILL before the lease can run out on the store (at once if the
lock is gone). Prefer DISTLOCK_STORE to --store for a URL with a password (ps shows
arguments); it is not passed on to the command.

EXIT CODES:
  the command's own (128+N if killed by signal N)
  64 bad usage or configuration    69 store unreachable    75 busy (--no-wait)
  76 lock lost while running       124 wait timed out      126/127 cannot run command

EXAMPLES:
  distlock run --store redis://10.0.0.5:6379 --no-wait nightly-report -- ./report.sh
  DISTLOCK_STORE=postgres://locks@db/app distlock run --wait 10m migrate -- ./migrate up
  distlock inspect --store zk://zk1:2181 --json nightly-report
";

/// A failure: the exit code and a one-line message.
type Fail = (u8, String);

fn usage(m: impl Into<String>) -> Fail {
    (EXIT_USAGE, m.into())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("distlock: cannot start: {e}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    match rt.block_on(run(args)) {
        Ok(code) => ExitCode::from(code),
        Err((code, message)) => {
            eprintln!("distlock: {message}");
            ExitCode::from(code)
        }
    }
}

/// Parses `30s`, `500ms`, `2m`, `1h`, or a number of seconds.
fn duration(flag: &str, v: &str) -> Result<Duration, Fail> {
    let (num, unit) = v
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((v, "s"), |i| (&v[..i], &v[i..]));
    let n: f64 = num
        .parse()
        .map_err(|_| usage(format!("{flag} {v:?}: not a duration (30s, 500ms, 2m, 1h)")))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(usage(format!("{flag} {v:?}: unit must be ms, s, m or h"))),
    };
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| *d <= Duration::from_secs(366 * 24 * 3600))
        .ok_or_else(|| usage(format!("{flag} {v:?}: not a duration of at most a year")))
}

/// The parsed command line.
#[derive(Debug, Default)]
struct Args {
    store: Option<String>,
    lease: Option<Duration>,
    wait: Option<WaitPolicy>,
    label: Option<String>,
    kill_after: Option<Duration>,
    tls_ca: Option<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    pg_mode: Option<String>,
    conflict_code: Option<u8>,
    json: bool,
    force: bool,
    help: bool,
    lease_id: Option<String>,
    key: Option<String>,
    command: Vec<String>,
}

fn parse(args: &[String]) -> Result<Args, Fail> {
    let mut a = Args::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        // `--flag=value` as well as `--flag value`.
        let (arg, inline) = match arg.split_once('=').filter(|_| arg.starts_with("--")) {
            Some((flag, v)) => (flag, Some(v.to_owned())),
            None => (arg.as_str(), None),
        };
        let mut value = |flag: &str| {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| usage(format!("{flag} needs a value")))
        };
        match arg {
            "--store" => a.store = Some(value("--store")?),
            "--lease" => a.lease = Some(duration("--lease", &value("--lease")?)?),
            "--wait" => {
                let v = value("--wait")?;
                a.wait = Some(if v == "forever" {
                    WaitPolicy::Forever
                } else {
                    WaitPolicy::Timeout(duration("--wait", &v)?)
                });
            }
            "--no-wait" => a.wait = Some(WaitPolicy::NoWait),
            "--label" => a.label = Some(value("--label")?),
            "--kill-after" => {
                a.kill_after = Some(duration("--kill-after", &value("--kill-after")?)?)
            }
            "--tls-ca" => a.tls_ca = Some(value("--tls-ca")?),
            "--tls-cert" => a.tls_cert = Some(value("--tls-cert")?),
            "--tls-key" => a.tls_key = Some(value("--tls-key")?),
            "--pg-mode" => a.pg_mode = Some(value("--pg-mode")?),
            "-E" | "--conflict-exit-code" => {
                let v = value("--conflict-exit-code")?;
                a.conflict_code = Some(v.parse().map_err(|_| {
                    usage(format!(
                        "--conflict-exit-code {v:?}: a number from 0 to 255"
                    ))
                })?);
            }
            "--lease-id" => a.lease_id = Some(value("--lease-id")?),
            "--json" => a.json = true,
            "--force" => a.force = true,
            "-h" | "--help" => a.help = true,
            "--" => {
                a.command = it.cloned().collect();
                break;
            }
            // The value of an unknown `--flag=value` is not shown: it may be a secret.
            flag if flag.starts_with('-') => return Err(usage(format!("unknown option {flag}"))),
            key => {
                if a.key.replace(key.to_owned()).is_some() {
                    return Err(usage(format!(
                        "one KEY only (then -- and the command), got {key:?}"
                    )));
                }
            }
        }
    }
    Ok(a)
}

async fn run(args: Vec<String>) -> Result<u8, Fail> {
    let (cmd, rest) = match args.split_first() {
        Some((c, rest)) => (c.as_str(), rest),
        None => return Err(usage(format!("no subcommand\n{USAGE}"))),
    };
    if matches!(cmd, "-h" | "--help" | "help") {
        print!("{USAGE}");
        return Ok(0);
    }
    if !matches!(cmd, "run" | "inspect" | "release") {
        return Err(usage(format!(
            "unknown subcommand {cmd:?} (run, inspect, release; --help)"
        )));
    }
    let a = parse(rest)?;
    if a.help {
        print!("{USAGE}");
        return Ok(0);
    }
    if let Some(m) = a
        .pg_mode
        .as_deref()
        .filter(|m| !["advisory", "lease", "xact"].contains(m))
    {
        return Err(usage(format!(
            "--pg-mode {m:?}: one of advisory, lease, xact"
        )));
    }
    let key = a.key.clone().ok_or_else(|| usage("no KEY given"))?;
    let key = LockKey::new(key).map_err(|e| usage(e.to_string()))?;
    let url = a
        .store
        .clone()
        .or_else(|| std::env::var("DISTLOCK_STORE").ok())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| usage("no store: give --store URL or set DISTLOCK_STORE"))?;
    let read = |flag: &str, path: &Option<String>| -> Result<Option<Vec<u8>>, Fail> {
        path.as_ref()
            .map(|p| std::fs::read(p).map_err(|e| usage(format!("{flag} {p}: {e}"))))
            .transpose()
    };
    let client = match (
        read("--tls-cert", &a.tls_cert)?,
        read("--tls-key", &a.tls_key)?,
    ) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => return Err(usage("--tls-cert and --tls-key go together")),
    };
    let opts = StoreOpts {
        lease: (cmd == "run").then(|| a.lease.unwrap_or(DEFAULT_LEASE)),
        pg_mode: a.pg_mode.clone().unwrap_or_else(|| "advisory".into()),
        tls: Tls {
            ca: read("--tls-ca", &a.tls_ca)?,
            client,
        },
    };
    match cmd {
        "run" => run_command(&a, key, &url, &opts).await,
        "inspect" => inspect(&a, key, &url, &opts).await,
        _ => release(&a, key, &url, &opts).await,
    }
}

/// The exit code and message for a failure before the command ran.
fn failed(e: LockError) -> Fail {
    let code = match &e {
        LockError::Contended { .. } => EXIT_BUSY,
        LockError::Timeout { .. } => EXIT_TIMEOUT,
        LockError::InvalidConfig(_)
        | LockError::InvalidKey { .. }
        | LockError::InvalidOptions(_)
        | LockError::Unsupported { .. } => EXIT_USAGE,
        _ => EXIT_UNREACHABLE,
    };
    (code, e.to_string())
}

async fn open(url: &str, opts: &StoreOpts) -> Result<Arc<dyn LockBackend>, Fail> {
    store::open(url, opts).await.map_err(failed)
}

async fn run_command(a: &Args, key: LockKey, url: &str, opts: &StoreOpts) -> Result<u8, Fail> {
    let (program, args) = a
        .command
        .split_first()
        .ok_or_else(|| usage("no command: distlock run KEY -- COMMAND [ARGS...]"))?;
    let mut meta = HolderMeta::this_process();
    if let Some(l) = &a.label {
        meta = meta.with_label(l.clone());
    }
    let lease = a.lease.unwrap_or(DEFAULT_LEASE);
    let options = LockOptions::default()
        .lease(lease)
        .wait(a.wait.unwrap_or(WaitPolicy::Forever))
        .meta(meta);
    options.validate().map_err(|e| usage(e.to_string()))?;
    let backend = open(url, opts).await?;
    let locks = LockClient::from_arc(backend).with_options(options);
    // Before the command starts: a signal in between must not end us and orphan it.
    let handler = |kind: SignalKind| signal(kind).map_err(|e| usage(e.to_string()));
    let (mut ints, mut terms, mut hups) = (
        handler(SignalKind::interrupt())?,
        handler(SignalKind::terminate())?,
        handler(SignalKind::hangup())?,
    );
    let guard = locks.acquire(key.as_str()).await.map_err(|e| {
        let (code, m) = failed(e);
        match a.conflict_code {
            Some(c) if [EXIT_BUSY, EXIT_TIMEOUT].contains(&code) => (c, m),
            _ => (code, m),
        }
    })?;
    let mut child = match tokio::process::Command::new(program)
        .args(args)
        .env("DISTLOCK_KEY", key.as_str())
        .env("DISTLOCK_TOKEN", guard.token().to_string())
        .env("DISTLOCK_LEASE_ID", guard.lease_id().to_string())
        // The store's URL may hold a password: not the command's business.
        .env_remove("DISTLOCK_STORE")
        // A group of its own: signals reach it (and what it starts) only through us.
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            let _ = guard.release().await;
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                EXIT_NOT_FOUND
            } else {
                EXIT_CANNOT_RUN
            };
            return Err((code, format!("cannot run {program}: {e}")));
        }
    };
    let group = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(i32::try_from(id).ok()?));
    let send = |sig: rustix::process::Signal| {
        if let Some(g) = group {
            let _ = rustix::process::kill_process_group(g, sig);
        }
    };
    let kill_after = a.kill_after.unwrap_or(Duration::from_secs(5));
    let mut status = guard.watch();
    // Once the lock is in doubt: when SIGKILL is due.
    let mut kill_at: Option<Instant> = None;
    let exit = loop {
        let kill_due = async {
            match kill_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            done = child.wait() => break done,
            _ = ints.recv() => send(rustix::process::Signal::INT),
            _ = terms.recv() => send(rustix::process::Signal::TERM),
            _ = hups.recv() => send(rustix::process::Signal::HUP),
            _ = status.changed(), if kill_at.is_none() => {}
            _ = guard.lost(), if kill_at.is_none() => {}
            () = kill_due => {
                send(rustix::process::Signal::KILL);
                kill_at = Some(Instant::now() + Duration::from_secs(3600));
            }
        }
        let status = guard.status();
        if kill_at.is_none() && status != LockStatus::Held {
            eprintln!("distlock: the lock on {key} is {status:?}: stopping the command");
            send(rustix::process::Signal::TERM);
            let now = Instant::now();
            // Gone already: no grace. In doubt: until the lock's safe deadline at most.
            // The kill needs a moment to take effect: it goes out a little before the
            // safe deadline (a tenth of the lease, at most 200 ms).
            let margin = (lease / 10).min(Duration::from_millis(200));
            let safe = match status {
                LockStatus::Uncertain => guard
                    .safe_until()
                    .and_then(|s| s.checked_sub(margin))
                    .unwrap_or(now),
                _ => now,
            };
            kill_at = Some(now.checked_add(kill_after).unwrap_or(safe).min(safe));
        }
    };
    // Whatever the command left in its group does not outlive a lock in doubt.
    let lost = kill_at.is_some() || guard.status() != LockStatus::Held;
    if lost {
        send(rustix::process::Signal::KILL);
    }
    // A lost lock's release is a courtesy: its lease ends on its own.
    let bound = if lost {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(3600)
    };
    let released = tokio::time::timeout(bound, guard.release())
        .await
        .unwrap_or_else(|_| Ok(ReleaseOutcome::NotHeld));
    let exit = exit.map_err(|e| (EXIT_UNREACHABLE, format!("waiting for the command: {e}")))?;
    // A lease found gone at the release was gone while the command ran.
    if lost || matches!(released, Ok(ReleaseOutcome::NotHeld)) {
        return Err((
            EXIT_LOST,
            format!("the lock on {key} was lost while the command ran"),
        ));
    }
    if let Err(e) = released {
        eprintln!("distlock: release failed (the lease will expire): {e}");
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(match (exit.code(), exit.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(1),
        (None, Some(s)) => u8::try_from(128 + s).unwrap_or(255),
        _ => 1,
    })
}

async fn inspect(a: &Args, key: LockKey, url: &str, opts: &StoreOpts) -> Result<u8, Fail> {
    let backend = open(url, opts).await?;
    let info = LockClient::from_arc(backend)
        .inspect(key.as_str())
        .await
        .map_err(failed)?;
    if a.json {
        let v = match &info {
            None => serde_json::json!({ "key": key.as_str(), "held": false }),
            Some(i) => serde_json::json!({
                "key": key.as_str(),
                "held": true,
                "lease_id": i.lease_id.to_string(),
                "token": i.token.get(),
                "host": i.meta.host,
                "pid": i.meta.pid,
                "label": i.meta.label,
                "remaining_ms": i.remaining.map(|r| r.as_millis() as u64),
            }),
        };
        println!("{v}");
    } else {
        match &info {
            None => println!("{key}: free"),
            Some(i) => println!(
                "{key}: held by lease {} (token {}, host {}, pid {}, label {}, {} left)",
                i.lease_id,
                i.token,
                i.meta.host.as_deref().unwrap_or("-"),
                i.meta.pid.map_or("-".into(), |p| p.to_string()),
                i.meta.label.as_deref().unwrap_or("-"),
                i.remaining
                    .map_or("unknown time".into(), |r| format!("{r:?}")),
            ),
        }
    }
    Ok(0)
}

async fn release(a: &Args, key: LockKey, url: &str, opts: &StoreOpts) -> Result<u8, Fail> {
    if !a.force {
        return Err(usage("release takes the lock from its holder: say --force"));
    }
    let id = a
        .lease_id
        .as_deref()
        .ok_or_else(|| usage("release needs --lease-id (see distlock inspect)"))?;
    let id =
        LeaseId::parse(id).map_err(|_| usage(format!("--lease-id {id:?} is not a lease id")))?;
    let backend = open(url, opts).await?;
    match backend
        .release(&LeaseRef::new(key.clone(), id))
        .await
        .map_err(failed)?
    {
        ReleaseOutcome::Released => {
            println!("{key}: released");
            Ok(0)
        }
        _ => {
            println!("{key}: not held by that lease");
            Ok(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_options_parse_or_say_why() {
        assert_eq!(
            duration("--wait", "30s").ok(),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            duration("--wait", "500ms").ok(),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            duration("--wait", "2m").ok(),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            duration("--wait", "1.5").ok(),
            Some(Duration::from_millis(1500))
        );
        for bad in ["", "x", "5x", "-1s", "1e400s"] {
            assert!(duration("--wait", bad).is_err(), "{bad}");
        }
        let args: Vec<String> = ["--no-wait", "k", "--", "echo", "--no-wait"]
            .map(String::from)
            .to_vec();
        let a = parse(&args).unwrap();
        assert_eq!(a.wait, Some(WaitPolicy::NoWait));
        assert_eq!(a.key.as_deref(), Some("k"));
        assert_eq!(a.command, ["echo", "--no-wait"]);
        assert!(parse(&["a".into(), "b".into()]).is_err(), "two keys");
        assert!(
            parse(&["--lease".into()]).is_err(),
            "a flag without its value"
        );
    }
}
