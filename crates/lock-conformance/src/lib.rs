#![doc = include_str!("../README.md")]

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use lock_core::{
    Backoff, Capabilities, LockBackend, LockClient, LockError, LockOptions, WaitPolicy,
};
use serde::Serialize;
use tokio::time::Instant;

mod cases;
pub mod history;
pub mod proxy;
pub mod scenario;

/// A boxed future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that can cut one client's connection to the server (a partition).
pub trait Cut: Send + Sync + fmt::Debug {
    /// Cuts (`true`) or heals (`false`).
    fn set_cut(&self, cut: bool);

    /// Loses the replies to the client's requests, which the server still carries out
    /// (`true`); `false` stops, and ends the connections whose replies were lost, as a
    /// broken connection would.
    fn lose_replies(&self, lost: bool);
}

impl Cut for proxy::Proxy {
    fn set_cut(&self, cut: bool) {
        proxy::Proxy::set_cut(self, cut)
    }

    fn lose_replies(&self, lost: bool) {
        self.set_drop_replies(lost);
        if !lost {
            self.reset_all();
        }
    }
}

impl Cut for lock_core::memory::MemoryBackend {
    fn set_cut(&self, cut: bool) {
        self.set_disconnected(cut)
    }

    fn lose_replies(&self, lost: bool) {
        lock_core::memory::MemoryBackend::lose_replies(self, lost)
    }
}

/// Opens a fresh client connection.
pub type ConnectFn =
    Arc<dyn Fn() -> BoxFuture<'static, Result<Arc<dyn LockBackend>, LockError>> + Send + Sync>;
/// Opens a fresh client connection that can be cut.
pub type CuttableFn = Arc<
    dyn Fn() -> BoxFuture<'static, Result<(Arc<dyn LockBackend>, Arc<dyn Cut>), LockError>>
        + Send
        + Sync,
>;

/// A backend under test.
#[non_exhaustive]
pub struct Target {
    /// Name used in reports ("redis", "pg-advisory", ...).
    pub name: String,
    /// Opens a fresh client connection.
    pub connect: ConnectFn,
    /// Opens a connection that can be cut; cases that need it are skipped without it.
    pub cuttable: Option<CuttableFn>,
    /// A key this backend rejects although the core accepts it, if there is one.
    pub illegal_key: Option<String>,
    /// For session backends: how long a dead client's session takes to end.
    pub session_timeout: Option<Duration>,
    /// The short lease used by expiry cases.
    pub short_lease: Duration,
    /// Random prefix for every key of this run.
    pub prefix: String,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Target {
    /// A target with defaults: no cut support, a 600 ms short lease, a random prefix.
    pub fn new(name: impl Into<String>, connect: ConnectFn) -> Self {
        let tag: u32 = rand::random();
        Self {
            name: name.into(),
            connect,
            cuttable: None,
            illegal_key: None,
            session_timeout: None,
            short_lease: Duration::from_millis(600),
            prefix: format!("conf-{tag:08x}:"),
        }
    }

    /// Adds cut support.
    #[must_use]
    pub fn cuttable(mut self, f: CuttableFn) -> Self {
        self.cuttable = Some(f);
        self
    }

    /// Names a key the backend must reject.
    #[must_use]
    pub fn illegal_key(mut self, k: impl Into<String>) -> Self {
        self.illegal_key = Some(k.into());
        self
    }

    /// Sets the session timeout (session backends).
    #[must_use]
    pub fn session_timeout(mut self, t: Duration) -> Self {
        self.session_timeout = Some(t);
        self
    }

    /// Sets the short lease.
    #[must_use]
    pub fn short_lease(mut self, t: Duration) -> Self {
        self.short_lease = t;
        self
    }
}

/// Records every status a guard goes through, with when, until `Lost` or `Released`.
pub fn record_statuses(
    g: &lock_core::LockGuard,
) -> tokio::task::JoinHandle<Vec<(Instant, lock_core::LockStatus)>> {
    let mut watch = g.watch();
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while watch.changed().await.is_ok() {
            let s = watch.borrow_and_update().clone();
            let done = matches!(
                s,
                lock_core::LockStatus::Lost(_) | lock_core::LockStatus::Released
            );
            seen.push((Instant::now(), s));
            if done {
                break;
            }
        }
        seen
    })
}

/// The in-memory backend as a target (cut = the simulated disconnect).
pub fn memory_target() -> Target {
    let store = lock_core::memory::MemoryStore::new();
    let s2 = store.clone();
    Target::new(
        "memory",
        Arc::new(move || {
            let b: Arc<dyn LockBackend> = Arc::new(store.connect());
            Box::pin(async move { Ok(b) })
        }),
    )
    .cuttable(Arc::new(move || {
        let conn = s2.connect();
        let b: Arc<dyn LockBackend> = Arc::new(conn.clone());
        let c: Arc<dyn Cut> = Arc::new(conn);
        Box::pin(async move { Ok((b, c)) })
    }))
}

/// The outcome of one case.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(tag = "outcome", rename_all = "lowercase")]
#[non_exhaustive]
pub enum Outcome {
    /// Passed, with what was measured.
    Passed {
        /// Measurements worth reporting.
        detail: String,
    },
    /// Failed, with why.
    Failed {
        /// Why.
        reason: String,
    },
    /// Did not apply, with why.
    Skipped {
        /// Why.
        reason: String,
    },
}

/// One case's result.
#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    /// Target name.
    pub target: String,
    /// Case name.
    pub case: String,
    /// Outcome.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Wall time in milliseconds.
    pub millis: u64,
}

/// A suite run's results.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SuiteReport {
    /// Every case, in order.
    pub results: Vec<CaseResult>,
}

impl SuiteReport {
    /// (passed, failed, skipped)
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for r in &self.results {
            match r.outcome {
                Outcome::Passed { .. } => c.0 += 1,
                Outcome::Failed { .. } => c.1 += 1,
                Outcome::Skipped { .. } => c.2 += 1,
            }
        }
        c
    }

    /// The failures, formatted.
    pub fn failures(&self) -> Vec<String> {
        self.results
            .iter()
            .filter_map(|r| match &r.outcome {
                Outcome::Failed { reason } => Some(format!("{}/{}: {reason}", r.target, r.case)),
                _ => None,
            })
            .collect()
    }

    /// Reports every case as skipped with `reason` (no server for this target).
    pub fn all_skipped(target: &str, reason: &str) -> Self {
        Self {
            results: case_names()
                .into_iter()
                .map(|case| CaseResult {
                    target: target.to_owned(),
                    case: case.to_owned(),
                    outcome: Outcome::Skipped {
                        reason: reason.to_owned(),
                    },
                    millis: 0,
                })
                .collect(),
        }
    }
}

/// The context a case runs with.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) target: Arc<Target>,
    pub(crate) caps: Capabilities,
    pub(crate) case: &'static str,
}

impl Ctx {
    pub(crate) fn key(&self, suffix: &str) -> String {
        format!("{}{}:{suffix}", self.target.prefix, self.case)
    }

    pub(crate) fn opts(&self) -> LockOptions {
        LockOptions::default()
            .lease(Duration::from_secs(10))
            .wait(WaitPolicy::Timeout(Duration::from_secs(15)))
            .op_timeout(Duration::from_secs(3))
            .backoff(Backoff::new(
                Duration::from_millis(5),
                Duration::from_millis(100),
            ))
            .label(format!("conformance {}", self.case))
    }

    pub(crate) async fn client(&self) -> Result<LockClient, String> {
        let backend = (self.target.connect)()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        Ok(LockClient::from_arc(backend).with_options(self.opts()))
    }

    pub(crate) async fn cuttable_client(&self) -> Result<(LockClient, Arc<dyn Cut>), String> {
        let f = self
            .target
            .cuttable
            .as_ref()
            .ok_or("target cannot cut connections")?;
        let (backend, cut) = f().await.map_err(|e| format!("connect: {e}"))?;
        Ok((LockClient::from_arc(backend).with_options(self.opts()), cut))
    }

    pub(crate) fn is_session(&self) -> bool {
        self.caps.lease == lock_core::LeaseKind::Session
    }

    /// How long a dead holder may keep the key: the lease, or the session timeout.
    pub(crate) fn expiry_bound(&self) -> Duration {
        if self.is_session() {
            self.target
                .session_timeout
                .unwrap_or(Duration::from_secs(10))
        } else {
            self.target.short_lease
        }
    }
}

type CaseFn = fn(Ctx) -> BoxFuture<'static, Result<String, String>>;
type NeedsFn = fn(&Capabilities, &Target) -> Option<&'static str>;

pub(crate) struct Case {
    pub(crate) name: &'static str,
    pub(crate) needs: NeedsFn,
    pub(crate) run: CaseFn,
}

/// The names of every case, in order.
pub fn case_names() -> Vec<&'static str> {
    cases::all().iter().map(|c| c.name).collect()
}

/// Runs every case (or those whose name contains one of the comma-separated parts of
/// `filter`) against `target`, printing one line per case as it ends.
pub async fn run_suite(target: Target, filter: Option<&str>) -> SuiteReport {
    let target = Arc::new(target);
    let mut report = SuiteReport::default();
    let caps = match (target.connect)().await {
        Ok(b) => b.capabilities(),
        Err(e) => {
            let r = SuiteReport::all_skipped(&target.name, "unused");
            for c in r.results {
                report.results.push(CaseResult {
                    outcome: Outcome::Failed {
                        reason: format!("cannot connect: {e}"),
                    },
                    ..c
                });
            }
            return report;
        }
    };
    for case in cases::all() {
        if filter.is_some_and(|f| !f.split(',').any(|part| case.name.contains(part))) {
            continue;
        }
        let started = Instant::now();
        let outcome = match (case.needs)(&caps, &target) {
            Some(reason) => Outcome::Skipped {
                reason: reason.to_owned(),
            },
            None => {
                let ctx = Ctx {
                    target: target.clone(),
                    caps,
                    case: case.name,
                };
                match tokio::time::timeout(Duration::from_secs(120), tokio::spawn((case.run)(ctx)))
                    .await
                {
                    Ok(Ok(Ok(detail))) => Outcome::Passed { detail },
                    Ok(Ok(Err(reason))) => Outcome::Failed { reason },
                    Ok(Err(join)) => Outcome::Failed {
                        reason: format!("case panicked: {join}"),
                    },
                    Err(_) => Outcome::Failed {
                        reason: "case did not finish within 120 s".into(),
                    },
                }
            }
        };
        let res = CaseResult {
            target: target.name.clone(),
            case: case.name.to_owned(),
            outcome,
            millis: started.elapsed().as_millis() as u64,
        };
        print_result(&res);
        report.results.push(res);
    }
    report
}

/// Prints one result line.
pub fn print_result(r: &CaseResult) {
    match &r.outcome {
        Outcome::Passed { detail } if detail.is_empty() => {
            println!("PASS {}/{} ({} ms)", r.target, r.case, r.millis)
        }
        Outcome::Passed { detail } => {
            println!("PASS {}/{} ({} ms): {detail}", r.target, r.case, r.millis)
        }
        Outcome::Failed { reason } => {
            println!("FAIL {}/{} ({} ms): {reason}", r.target, r.case, r.millis)
        }
        Outcome::Skipped { reason } => println!("SKIP {}/{}: {reason}", r.target, r.case),
    }
}
