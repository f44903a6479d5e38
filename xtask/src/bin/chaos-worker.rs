//! A chaos workload process: repeatedly acquires one key, does a read-modify-write of a
//! counter on the fenced store with the lock's token, and releases. Prints every lock
//! event as one JSON line on stdout, stamped with the host-wide monotonic clock
//! (`CLOCK_MONOTONIC`, microseconds), so the harness can merge the histories of several
//! processes and check them. Being a real process, it can be paused (SIGSTOP) and killed.
//!
//! Usage: `chaos-worker <backend> <url> <key> <client> <store addr> <lease ms> <seconds>
//! [--cancel-rate p] [--starve-every n] [--starve-ms n] [--pause-after-read n]
//! [--replica-acks n] [--work-ms n] [--tamper reuse|lower]`. `--pause-after-read n` stops
//! the worker between the read and the write of its n-th grant.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use lock_conformance::history::{Event, Stamped};
use lock_core::{LockClient, LockOptions, WaitPolicy};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[path = "../worker_backend.rs"]
mod worker_backend;
use worker_backend::backend;

fn now_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0) / 1000
}

fn emit(event: Event) {
    let line = serde_json::to_string(&Stamped {
        at_us: now_us(),
        event,
    })
    .unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// One line-protocol connection to the fenced store.
struct Store {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Store {
    async fn ask(&mut self, line: &str) -> Result<String, String> {
        self.w
            .write_all(format!("{line}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut reply = String::new();
        self.r
            .read_line(&mut reply)
            .await
            .map_err(|e| e.to_string())?;
        Ok(reply.trim().to_owned())
    }
}

fn main() -> std::process::ExitCode {
    // One thread: a blocked thread starves the renewal task too (the starvation fault).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chaos-worker: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 7 {
        return Err("usage: chaos-worker <backend> <url> <key> <client> <store> <lease ms> <seconds> [--cancel-rate p] [--starve-every n] [--pause-after-read n] [--replica-acks n] [--work-ms n] [--tamper reuse|lower]".into());
    }
    let (kind, url, key, client, store_addr) = (&args[0], &args[1], &args[2], &args[3], &args[4]);
    let lease = Duration::from_millis(args[5].parse().map_err(|e| format!("lease: {e}"))?);
    let seconds: u64 = args[6].parse().map_err(|e| format!("seconds: {e}"))?;
    let mut cancel_rate = 0.0f64;
    let mut starve_every = 0u64;
    let mut starve: Option<Duration> = None;
    let mut pause_after_read = 0u64;
    let mut replica_acks = 0usize;
    let mut work = Duration::from_millis(20);
    let mut tamper: Option<String> = None;
    let mut it = args[7..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--cancel-rate" => cancel_rate = it.next().and_then(|v| v.parse().ok()).unwrap_or(0.0),
            "--starve-every" => starve_every = it.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            "--starve-ms" => {
                starve = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .map(Duration::from_millis)
            }
            "--work-ms" => {
                work = Duration::from_millis(it.next().and_then(|v| v.parse().ok()).unwrap_or(20))
            }
            "--replica-acks" => replica_acks = it.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            "--pause-after-read" => {
                pause_after_read = it.next().and_then(|v| v.parse().ok()).unwrap_or(0)
            }
            "--tamper" => tamper = it.next().cloned(),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let id: u64 = client
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap_or(0);
    let mut b = backend(kind, url, replica_acks).await?;
    if let Some(mode) = &tamper {
        b = std::sync::Arc::new(Tampered::new(b, mode)?);
    }
    let locks = LockClient::from_arc(b).with_options(
        LockOptions::default()
            .lease(lease)
            .wait(WaitPolicy::Timeout(Duration::from_secs(15)))
            .op_timeout(Duration::from_millis(800)),
    );
    let stream = TcpStream::connect(store_addr.as_str())
        .await
        .map_err(|e| format!("store: {e}"))?;
    let (r, w) = stream.into_split();
    let mut store = Store {
        r: BufReader::new(r),
        w,
    };
    let end = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let (mut n, mut grants) = (0u64, 0u64);
    while tokio::time::Instant::now() < end {
        n += 1;
        let op = id * 1_000_000 + n;
        emit(Event::AcquireInvoked {
            op,
            client: client.clone(),
            key: key.clone(),
        });
        let cancel = rand::random::<f64>() < cancel_rate;
        let res = if cancel {
            let d = Duration::from_millis(rand::random::<u64>() % 20);
            match tokio::time::timeout(d, locks.acquire(key)).await {
                Ok(r) => r,
                Err(_) => {
                    emit(Event::AcquireUnknown { op });
                    continue;
                }
            }
        } else {
            locks.acquire(key).await
        };
        let g = match res {
            Ok(g) => g,
            Err(e) if e.is_timeout() || matches!(e, lock_core::LockError::Contended { .. }) => {
                emit(Event::AcquireFailed { op });
                continue;
            }
            Err(_) => {
                emit(Event::AcquireUnknown { op });
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        grants += 1;
        let token = g.token().get();
        emit(Event::Granted {
            op,
            client: client.clone(),
            key: key.clone(),
            token,
        });
        // Reports the guard's loss as it happens (the harness asks for it where a fault
        // must cause one).
        let mut status = g.watch();
        let (c, k) = (client.clone(), key.clone());
        tokio::spawn(async move {
            while status.changed().await.is_ok() {
                match &*status.borrow_and_update() {
                    lock_core::LockStatus::Lost(_) => {
                        emit(Event::Lost {
                            client: c,
                            key: k,
                            token,
                        });
                        return;
                    }
                    lock_core::LockStatus::Released => return,
                    _ => {}
                }
            }
        });
        // Not under libfaketime: a faked clock would misstate the bound.
        if let Some(safe) = g
            .safe_until()
            .filter(|_| std::env::var_os("FAKETIME").is_none())
        {
            let left = safe.saturating_duration_since(tokio::time::Instant::now());
            emit(Event::LeaseBound {
                client: client.clone(),
                key: key.clone(),
                token,
                until_us: now_us() + left.as_micros() as u64,
            });
        }
        if starve_every > 0 && n.is_multiple_of(starve_every) {
            // Block the only runtime thread: renewals cannot run.
            std::thread::sleep(starve.unwrap_or(lease * 2));
        }
        // Read-modify-write on the fenced store, with the token.
        let read = store.ask(&format!("GET {key} {token}")).await?;
        if pause_after_read > 0 && grants == pause_after_read {
            // Stop here, between the read and the write, holding the lock: the harness
            // continues us (SIGCONT) after the lease has run out.
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::STOP,
            );
        }
        // The "work" between the read and the write.
        tokio::time::sleep(work).await;
        // A refused read (a newer holder came by) is not followed by a write.
        if let Ok(v) = read.parse::<u64>() {
            let _ = store
                .ask(&format!("PUT {client} {key} {token} {}", v + 1))
                .await?;
        }
        emit(Event::ReleaseInvoked {
            client: client.clone(),
            key: key.clone(),
            token,
        });
        let _ = g.release().await;
    }
    Ok(())
}

/// A backend that misreports its grants' tokens, for the checker's negative controls
/// against a real store: `reuse` hands every grant after the first the first grant's
/// token; `lower` hands each grant a token far below the store's.
#[derive(Debug)]
pub(crate) struct Tampered {
    inner: Arc<dyn lock_core::LockBackend>,
    reuse: bool,
    first: std::sync::Mutex<Option<lock_core::FencingToken>>,
}

impl Tampered {
    pub(crate) fn new(inner: Arc<dyn lock_core::LockBackend>, mode: &str) -> Result<Self, String> {
        let reuse = match mode {
            "reuse" => true,
            "lower" => false,
            other => return Err(format!("unknown --tamper {other}")),
        };
        Ok(Self {
            inner,
            reuse,
            first: std::sync::Mutex::new(None),
        })
    }

    fn tamper(&self, mut g: lock_core::Grant) -> lock_core::Grant {
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        g.token = match (*first, self.reuse) {
            (Some(f), true) => f,
            (None, true) => {
                *first = Some(g.token);
                g.token
            }
            (_, false) => lock_core::FencingToken::new(g.token.get() / 2),
        };
        g
    }
}

#[lock_core::async_trait]
impl lock_core::LockBackend for Tampered {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn capabilities(&self) -> lock_core::Capabilities {
        self.inner.capabilities()
    }
    async fn try_acquire(
        &self,
        req: &lock_core::AcquireRequest,
    ) -> Result<lock_core::Grant, lock_core::LockError> {
        self.inner.try_acquire(req).await.map(|g| self.tamper(g))
    }
    async fn acquire(
        &self,
        req: &lock_core::AcquireRequest,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<lock_core::Grant, lock_core::LockError> {
        self.inner
            .acquire(req, deadline)
            .await
            .map(|g| self.tamper(g))
    }
    async fn renew(
        &self,
        lease: &lock_core::LeaseRef,
        ttl: Duration,
    ) -> Result<tokio::time::Instant, lock_core::LockError> {
        self.inner.renew(lease, ttl).await
    }
    async fn release(
        &self,
        lease: &lock_core::LeaseRef,
    ) -> Result<lock_core::ReleaseOutcome, lock_core::LockError> {
        self.inner.release(lease).await
    }
    async fn inspect(
        &self,
        key: &lock_core::LockKey,
    ) -> Result<Option<lock_core::LockInfo>, lock_core::LockError> {
        self.inner.inspect(key).await
    }
}
