//! Redlock: one lock over N independent Redis servers.
//!
//! Acquire sends the single-node acquire script to every configured node in parallel. It
//! succeeds when a majority **of the configured nodes** granted it and the validity,
//! `lease - elapsed - drift` with `elapsed` measured from before the first request went out
//! (monotonic clock) and `drift = lease/100 + 2 ms`, is still positive; otherwise each node
//! that granted gives back the grant of the token it answered, so that a give-back arriving
//! late spares the next round's grant (made again under the same lease, with a new token).
//! Renewal also needs a majority of the configured nodes.
//!
//! ## Nodes that are down, or come back empty
//!
//! A node unreachable when the backend connects is kept: it is connected again on later
//! operations and takes part once it answers. [`RedlockBackend::connect`] fails (with a
//! retryable error) when fewer than a majority answer, since no lock could be granted.
//!
//! A node that restarts forgets the leases it held (without persistence, or from a snapshot
//! older than its last grants), and so does one whose data is flushed: another client could
//! then gather a majority that overlaps a live holder's only in that node. So every node
//! keeps a marker (its `run_id` and the time its lock data began); a node whose marker is
//! missing or names another `run_id` grants nothing for [`RedlockConfig::max_lease`] (the
//! longest lease any client may take, which acquire and extend enforce), after which no
//! lease it forgot can still run. A node new to the lock sits out the same way once:
//! [`RedlockBackend::warm_up`] starts that wait and tells how long it is.
//!
//! Give every client of the nodes the same `max_lease`. A client configured with a shorter
//! one than another's would let a node that lost data sit out too briefly, so a marker
//! records the longest sit-out any client asked for, every reply names it, and a client
//! that learns a longer one than its own asks every node for that from then on (an acquire
//! that learned one is given back, with a retryable error). A client learns it only from
//! nodes that the longer-lease clients' requests reached since their data began (and that
//! answer in time); without such a node among those it reaches, it goes by its own.
//!
//! ## Fencing tokens
//!
//! Each node issues its own token, `max(last + 1, its clock in µs)`. The grant's token is the
//! highest of the majority's, and before the grant is returned that value is written as a
//! floor into the token record of a majority of nodes (a second parallel round).
//! Argument: if grant A completed before acquire B was invoked, B's majority and the
//! majority that took A's floor share a node `n`; B's request reached `n` after A's floor
//! did, so `n` issued B a token above A's, and B's token (the maximum over its majority) is
//! at least that. A node that restarts empty loses its record but not its clock term, so
//! this holds across such a restart as long as the nodes' clocks agree to within the time a
//! restart takes (on one host they share a clock). Hence
//! [`TokenGuarantee::Monotonic`], not `Durable`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::join_all;
use lock_core::{
    AcquireRequest, Capabilities, FencingToken, Grant, LeaseKind, LeaseRef, LockBackend, LockError,
    LockInfo, LockKey, ReleaseOutcome, TokenGuarantee,
};
use tokio::sync::OnceCell;
use tokio::time::{timeout, Instant};

use crate::batch::Outcome;
use crate::{RedisBackend, RedisConfig};

const NAME: &str = "redlock";
/// How long a node that could not be reached is left alone before the next connect attempt.
const RECONNECT_EVERY: Duration = Duration::from_millis(500);

/// Settings for [`RedlockBackend`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedlockConfig {
    /// One config per node (fairness is forced off: Redlock has no queue).
    pub nodes: Vec<RedisConfig>,
    /// The longest lease any client of these nodes takes (and extends to). A node that lost
    /// its lock data grants nothing for this long (the longest any client asked for since).
    /// Give every client of one set of nodes the same value: a client learns a longer one
    /// from nodes that the other clients' requests reached (and logs a warning), but not
    /// from nodes that lost their data since, which could then take part before a longer
    /// lease they lost has run out (see the module docs). Default 60 s.
    pub max_lease: Duration,
}

impl RedlockConfig {
    /// Defaults for `urls`.
    pub fn new(urls: &[&str]) -> Self {
        Self {
            nodes: urls.iter().map(|u| RedisConfig::new(*u)).collect(),
            max_lease: Duration::from_secs(60),
        }
    }

    /// One explicit config per node.
    pub fn with_nodes(nodes: Vec<RedisConfig>) -> Self {
        Self {
            nodes,
            max_lease: Duration::from_secs(60),
        }
    }

    /// Sets the longest lease.
    #[must_use]
    pub fn max_lease(mut self, max: Duration) -> Self {
        self.max_lease = max;
        self
    }

    /// Checks the settings before connecting.
    pub fn validate(&self) -> Result<(), LockError> {
        if self.nodes.is_empty() {
            return Err(LockError::InvalidConfig(
                "Redlock needs at least one node".into(),
            ));
        }
        if self.max_lease < lock_core::options::MIN_LEASE
            || self.max_lease > lock_core::options::MAX_LEASE
        {
            return Err(LockError::InvalidConfig(format!(
                "max_lease {:?} is out of range",
                self.max_lease
            )));
        }
        self.nodes.iter().try_for_each(RedisConfig::validate)
    }
}

/// One configured node, connected when it can be.
#[derive(Debug)]
struct Node {
    index: usize,
    cfg: RedisConfig,
    /// The longest lease (ms), shared by the nodes: see [`crate::batch::Params`].
    sit_out: std::sync::Arc<AtomicU64>,
    conn: OnceCell<RedisBackend>,
    failed_at: Mutex<Option<Instant>>,
    /// The `run_id` of every node connected so far, by node index: two entries naming one
    /// server would count it twice in every majority.
    servers: std::sync::Arc<Mutex<Vec<(String, usize)>>>,
}

impl Node {
    /// The node's backend, connecting it if it was not reachable so far.
    async fn backend(&self) -> Result<&RedisBackend, LockError> {
        if let Some(b) = self.conn.get() {
            return Ok(b);
        }
        let recent = self
            .failed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < RECONNECT_EVERY);
        if recent {
            return Err(LockError::backend(NAME, true, "node unreachable"));
        }
        let res = self
            .conn
            .get_or_try_init(|| async {
                let b = RedisBackend::open(self.cfg.clone(), self.sit_out.clone()).await?;
                let mut servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((_, other)) = servers.iter().find(|(r, _)| r == b.run_id()) {
                    return Err(LockError::InvalidConfig(format!(
                        "Redlock nodes {} and {} are the same server (run_id {}): it would \
                         count twice in every majority",
                        other + 1,
                        self.index + 1,
                        b.run_id()
                    )));
                }
                servers.push((b.run_id().to_owned(), self.index));
                Ok(b)
            })
            .await;
        if res.is_err() {
            *self.failed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        res
    }
}

/// A Redlock backend over independent nodes.
#[derive(Clone, Debug)]
pub struct RedlockBackend {
    nodes: std::sync::Arc<Vec<Node>>,
    op_timeout: Duration,
    max_lease: Duration,
    /// The sit-out the nodes are asked for: `max_lease`, or a longer one a node's marker
    /// records (another client's).
    sit_out: std::sync::Arc<AtomicU64>,
}

impl RedlockBackend {
    /// Connects to the nodes at `urls` with default settings (see [`RedlockBackend::connect_with`]).
    pub async fn connect(urls: &[&str]) -> Result<Self, LockError> {
        Self::connect_with(RedlockConfig::new(urls)).await
    }

    /// Connects to every node. Fails when fewer than a majority answer (retryable), or when
    /// a node that answers is refused (see [`RedisBackend::connect_with`]); nodes that do not
    /// answer are kept and connected again later.
    pub async fn connect_with(cfg: RedlockConfig) -> Result<Self, LockError> {
        cfg.validate()?;
        let op_timeout = cfg
            .nodes
            .iter()
            .map(|c| c.op_timeout)
            .max()
            .unwrap_or(Duration::from_secs(2));
        let servers = std::sync::Arc::default();
        let sit_out = std::sync::Arc::new(AtomicU64::new(cfg.max_lease.as_millis() as u64));
        let nodes: Vec<Node> = cfg
            .nodes
            .into_iter()
            .enumerate()
            .map(|(index, c)| Node {
                index,
                cfg: c.fair(false),
                sit_out: std::sync::Arc::clone(&sit_out),
                conn: OnceCell::new(),
                failed_at: Mutex::new(None),
                servers: std::sync::Arc::clone(&servers),
            })
            .collect();
        let me = Self {
            nodes: std::sync::Arc::new(nodes),
            op_timeout,
            max_lease: cfg.max_lease,
            sit_out,
        };
        let mut errors = Vec::new();
        for r in me
            .on_all(|n| async move { n.backend().await.map(|_| ()) })
            .await
        {
            match r {
                Ok(()) => {}
                Err(e @ LockError::InvalidConfig(_)) => return Err(e),
                Err(e) => errors.push(e.to_string()),
            }
        }
        let up = me.nodes.len() - errors.len();
        if up < me.quorum() {
            return Err(LockError::backend(
                NAME,
                true,
                format!(
                    "only {up} of {} nodes reachable, a majority is {}: {}",
                    me.nodes.len(),
                    me.quorum(),
                    errors.join("; ")
                ),
            ));
        }
        Ok(me)
    }

    /// Makes every reachable node check its marker, which starts the wait of a node new to
    /// the lock (or one that lost its data), and returns how long until a majority of the
    /// configured nodes takes part in grants (zero if one does now).
    pub async fn warm_up(&self) -> Result<Duration, LockError> {
        let key = LockKey::new("\u{1F512}warm-up")?;
        let req = AcquireRequest::new(
            key,
            lock_core::options::MIN_LEASE,
            lock_core::HolderMeta::default(),
            lock_core::Backoff::default(),
        );
        let mut results = Vec::new();
        // A round that learned a longer sit-out from a marker is repeated, so that every
        // node sits out that long.
        for _ in 0..3 {
            let asked = self.sit_out.load(Ordering::Relaxed);
            results = self
                .on_all(|n| async {
                    let b = n.backend().await?;
                    let a = b.attempt(&req, false).await;
                    let _ = b.release(&req.lease()).await;
                    a
                })
                .await;
            if self.sit_out.load(Ordering::Relaxed) == asked {
                break;
            }
        }
        let mut waits: Vec<Duration> = results
            .iter()
            .map(|r| match r {
                Ok(a) if a.outcome == Outcome::SitsOut => {
                    Duration::from_millis(a.pttl.max(0) as u64)
                }
                Ok(_) => Duration::ZERO,
                Err(_) => Duration::MAX,
            })
            .collect();
        waits.sort();
        let wait = waits[self.quorum() - 1];
        if wait == Duration::MAX {
            return Err(LockError::backend(
                NAME,
                true,
                "fewer than a majority of the nodes answer",
            ));
        }
        Ok(wait)
    }

    /// A majority of the configured nodes.
    fn quorum(&self) -> usize {
        self.nodes.len() / 2 + 1
    }

    async fn on_all<'a, T, F, Fut>(&'a self, f: F) -> Vec<Result<T, LockError>>
    where
        F: Fn(&'a Node) -> Fut,
        Fut: std::future::Future<Output = Result<T, LockError>> + 'a,
    {
        let t = self.op_timeout;
        join_all(
            self.nodes
                .iter()
                .map(|n| lock_core::backend::bounded(NAME, "node request", t, f(n))),
        )
        .await
    }

    /// Gives back a round's grants: on each node that granted, the grant of the token it
    /// answered. A later round under the same lease is granted again with a new token, so
    /// a give-back that reaches a node after it (a slow node, requests reordered by a
    /// reconnect) spares it. A late grant on a node that did not answer is undone by the
    /// node's batcher, or ends with its lease.
    async fn give_back(&self, req: &AcquireRequest, granted: &[(&Node, u64)]) {
        let (lease, t) = (req.lease(), self.op_timeout);
        join_all(granted.iter().map(|&(n, token)| {
            let lease = &lease;
            lock_core::backend::bounded(NAME, "give back", t, async move {
                n.backend().await?.give_back(lease, Some(token)).await
            })
        }))
        .await;
    }

    /// One acquire round on every node: a grant when a majority granted in time and took
    /// the token floor; otherwise given back.
    async fn round(&self, req: &AcquireRequest) -> Result<Grant, LockError> {
        let asked = self.sit_out.load(Ordering::Relaxed);
        let sent = Instant::now();
        let results = self
            .on_all(|n| async move { n.backend().await?.attempt(req, false).await })
            .await;
        let mut granted = Vec::new();
        let (mut refused, mut sitting, mut errors) = (0, 0, Vec::new());
        // Every node grants a whole lease (a lease granted again gets a new one).
        let valid_until = sent + req.ttl;
        for (node, r) in self.nodes.iter().zip(results) {
            match r {
                Ok(a) => match a.outcome {
                    Outcome::Granted => granted.push((node, a.token)),
                    Outcome::Refused => refused += 1,
                    Outcome::SitsOut => sitting += 1,
                    // Held, as far as this node can tell: the other nodes decide.
                    Outcome::Foreign => {
                        tracing::warn!(node = node.index + 1, key = %req.key, "the lock key holds a value this library did not write");
                        refused += 1;
                    }
                },
                Err(e) => errors.push(e),
            }
        }
        if granted.len() >= self.quorum() && Instant::now() + drift(req.ttl) < valid_until {
            let top = granted.iter().map(|(_, t)| *t).max().unwrap_or(0);
            // The floor goes to the granting nodes only (a majority): a node that did not
            // answer the first round would only make the second wait for its timeout.
            let t = self.op_timeout;
            let floors = join_all(granted.iter().map(|(n, _)| async move {
                match timeout(t, n.backend()).await {
                    Ok(Ok(b)) => timeout(t, b.raise_floor(&req.key, top))
                        .await
                        .unwrap_or_else(|_| Err(LockError::backend(NAME, true, "timeout"))),
                    _ => Err(LockError::backend(NAME, true, "node unreachable")),
                }
            }))
            .await;
            let raised = floors.iter().filter(|r| r.is_ok()).count();
            if raised >= self.quorum() && Instant::now() + drift(req.ttl) < valid_until {
                if self.sit_out.load(Ordering::Relaxed) == asked {
                    return Ok(Grant::ttl(FencingToken::new(top), valid_until));
                }
                // The round learned a longer sit-out than it asked for: it may count nodes
                // that lost their data and sat out only the shorter one. Give it back; the
                // next try asks for the longer one.
                self.give_back(req, &granted).await;
                return Err(LockError::backend(
                    NAME,
                    true,
                    "a node names a longer max_lease than this client's: try again (it is asked for now)",
                ));
            }
        }
        self.give_back(req, &granted).await;
        let n = self.nodes.len();
        if refused > n - self.quorum() {
            // Held elsewhere on enough nodes that no majority can form.
            return Err(LockError::contended(&req.key));
        }
        if let Some(e) = errors.iter().find(|e| !e.is_retryable()) {
            return Err(LockError::backend(NAME, false, e.to_string()));
        }
        let first = errors.first().map(|e| format!(": {e}")).unwrap_or_default();
        Err(LockError::backend(
            NAME,
            true,
            format!(
                "granted by {} of {n} nodes, a majority is {} ({refused} held by another, \
                 {sitting} sitting out after losing their data, {} unreachable){first}",
                granted.len(),
                self.quorum(),
                errors.len()
            ),
        ))
    }

    fn check_lease(&self, ttl: Duration) -> Result<(), LockError> {
        lock_core::options::check_lease("lease", ttl)?;
        if ttl > self.max_lease {
            return Err(LockError::InvalidOptions(format!(
                "lease {ttl:?} is longer than this Redlock's max_lease {:?}",
                self.max_lease
            )));
        }
        Ok(())
    }
}

fn drift(ttl: Duration) -> Duration {
    lock_core::options::drift_for(ttl)
}

#[async_trait]
impl LockBackend for RedlockBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(LeaseKind::Ttl)
            .fair(false)
            .notify_waits(false)
            .tokens(TokenGuarantee::Monotonic)
    }

    async fn try_acquire(&self, req: &AcquireRequest) -> Result<Grant, LockError> {
        self.check_lease(req.ttl)?;
        self.round(req).await
    }

    /// Polls [`LockBackend::try_acquire`] with jittered backoff until `deadline`. A
    /// majority that is out of reach for now (nodes down, or sitting out after losing their
    /// data) is waited out like a held key; at the deadline the last such error is
    /// returned rather than a timeout.
    async fn acquire(
        &self,
        req: &AcquireRequest,
        deadline: Option<Instant>,
    ) -> Result<Grant, LockError> {
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            let unavailable = match self.try_acquire(req).await {
                Err(LockError::Contended { .. }) => None,
                Err(e) if e.is_retryable() => Some(e),
                other => return other,
            };
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(unavailable.unwrap_or(LockError::timeout(&req.key, now - started)));
            }
            let mut pause = req.backoff.delay(attempt);
            if let Some(d) = deadline {
                pause = pause.min(d - now);
            }
            attempt = attempt.saturating_add(1);
            tokio::time::sleep(pause).await;
        }
    }

    async fn renew(&self, lease: &LeaseRef, ttl: Duration) -> Result<Instant, LockError> {
        self.check_lease(ttl)?;
        let sent = Instant::now();
        let results = self
            .on_all(|n| async move { n.backend().await?.renew(lease, ttl).await })
            .await;
        let ok = results.iter().filter(|r| r.is_ok()).count();
        let not_held = results
            .iter()
            .filter(|r| matches!(r, Err(LockError::NotHeld { .. })))
            .count();
        if ok >= self.quorum() && Instant::now() + drift(ttl) < sent + ttl {
            return Ok(sent + ttl);
        }
        if not_held > self.nodes.len() - self.quorum() {
            return Err(LockError::NotHeld {
                key: lease.key.to_string(),
            });
        }
        Err(LockError::backend(
            NAME,
            true,
            format!(
                "renewal reached {ok} of {} nodes, a majority is {}",
                self.nodes.len(),
                self.quorum()
            ),
        ))
    }

    async fn release(&self, lease: &LeaseRef) -> Result<ReleaseOutcome, LockError> {
        let results = self
            .on_all(|n| async move { n.backend().await?.release(lease).await })
            .await;
        let answered = results.iter().filter(|r| r.is_ok()).count();
        let released = results
            .iter()
            .any(|r| matches!(r, Ok(ReleaseOutcome::Released)));
        if answered < self.quorum() {
            let first = results
                .into_iter()
                .find_map(|r| r.err())
                .map(|e| e.to_string())
                .unwrap_or_default();
            return Err(LockError::backend(
                NAME,
                true,
                format!("release reached {answered} nodes: {first}"),
            ));
        }
        Ok(if released {
            ReleaseOutcome::Released
        } else {
            ReleaseOutcome::NotHeld
        })
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>, LockError> {
        let results = self
            .on_all(|n| async move { n.backend().await?.inspect(key).await })
            .await;
        let mut seen: Vec<(LockInfo, usize)> = Vec::new();
        let mut answered = 0;
        for info in results.into_iter().flatten() {
            answered += 1;
            if let Some(info) = info {
                match seen.iter_mut().find(|(i, _)| i.lease_id == info.lease_id) {
                    Some((i, n)) => {
                        // The grant's token is the highest of its majority's.
                        i.token = i.token.max(info.token);
                        *n += 1;
                    }
                    None => seen.push((info, 1)),
                }
            }
        }
        if answered < self.quorum() {
            return Err(LockError::backend(
                NAME,
                true,
                format!("inspect reached {answered} nodes"),
            ));
        }
        let quorum = self.quorum();
        Ok(seen
            .into_iter()
            .find(|(_, n)| *n >= quorum)
            .map(|(info, _)| info.waiters(None)))
    }
}
