//! Redlock: one lock over N independent Redis servers.
//!
//! Acquire sends the single-node acquire script to every node in parallel. It succeeds when
//! a majority granted it and the validity, `lease - elapsed - drift` with `elapsed` measured
//! from before the first request went out (monotonic clock) and `drift = lease/100 + 2 ms`,
//! is still positive; otherwise it releases on every node. Renewal also needs a majority.
//!
//! ## Fencing tokens
//!
//! Each node issues its own token, `max(last + 1, its clock in µs)`. The grant's token is the
//! highest of the majority's, and before the grant is returned that value is written as a
//! floor into the token counter of a majority of nodes (a second parallel round).
//! Argument: if grant A completed before acquire B was invoked, B's majority and the
//! majority that took A's floor share a node `n`; B's request reached `n` after A's floor
//! did, so `n` issued B a token above A's, and B's token (the maximum over its majority) is
//! at least that. A node that restarts empty loses its counter but not its clock term, so
//! this holds across such a restart as long as the nodes' clocks agree to within the time a
//! restart takes (on one host they share a clock). Hence
//! [`TokenGuarantee::Monotonic`], not `Durable`.

use std::time::Duration;

use async_trait::async_trait;
use futures::future::join_all;
use lock_core::{
    AcquireRequest, Capabilities, FencingToken, Grant, LeaseKind, LeaseRef, LockBackend, LockError,
    LockInfo, LockKey, ReleaseOutcome, TokenGuarantee,
};
use tokio::time::{timeout, Instant};

use crate::{RedisBackend, RedisConfig};

const NAME: &str = "redlock";

/// A Redlock backend over independent nodes.
#[derive(Clone, Debug)]
pub struct RedlockBackend {
    nodes: Vec<RedisBackend>,
    op_timeout: Duration,
}

impl RedlockBackend {
    /// Connects to every node. Nodes that cannot be reached now are an error only if fewer
    /// than a majority connect; the others are skipped (they may be started later by
    /// creating a new backend).
    pub async fn connect(urls: &[&str]) -> Result<Self, LockError> {
        Self::connect_with(
            urls.iter()
                .map(|u| RedisConfig::new(*u).fair(false))
                .collect(),
        )
        .await
    }

    /// Connects with one config per node (fairness is forced off: Redlock has no queue).
    pub async fn connect_with(configs: Vec<RedisConfig>) -> Result<Self, LockError> {
        if configs.is_empty() {
            return Err(LockError::InvalidConfig(
                "Redlock needs at least one node".into(),
            ));
        }
        let total = configs.len();
        let op_timeout = configs
            .iter()
            .map(|c| c.op_timeout)
            .max()
            .unwrap_or(Duration::from_secs(2));
        for c in &configs {
            c.validate()?;
        }
        let connected = join_all(
            configs
                .into_iter()
                .map(|c| RedisBackend::connect_with(c.fair(false))),
        )
        .await;
        let mut nodes = Vec::new();
        let mut errors = Vec::new();
        for c in connected {
            match c {
                Ok(n) => nodes.push(n),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if nodes.len() < total / 2 + 1 {
            return Err(LockError::backend(
                NAME,
                true,
                format!(
                    "only {} of {total} nodes reachable, a majority is {}: {}",
                    nodes.len(),
                    total / 2 + 1,
                    errors.join("; ")
                ),
            ));
        }
        Ok(Self { nodes, op_timeout })
    }

    /// A Redlock over already connected single-node backends (the total is their number).
    pub fn from_nodes(nodes: Vec<RedisBackend>) -> Result<Self, LockError> {
        if nodes.is_empty() {
            return Err(LockError::InvalidConfig(
                "Redlock needs at least one node".into(),
            ));
        }
        let op_timeout = nodes
            .iter()
            .map(|n| n.config().op_timeout)
            .max()
            .unwrap_or(Duration::from_secs(2));
        Ok(Self { nodes, op_timeout })
    }

    fn quorum(&self) -> usize {
        self.nodes.len() / 2 + 1
    }

    async fn on_all<'a, T, F, Fut>(&'a self, f: F) -> Vec<Result<T, LockError>>
    where
        F: Fn(&'a RedisBackend) -> Fut,
        Fut: std::future::Future<Output = Result<T, LockError>> + 'a,
    {
        let t = self.op_timeout;
        join_all(self.nodes.iter().map(|n| {
            let fut = f(n);
            async move {
                timeout(t, fut)
                    .await
                    .unwrap_or(Err(LockError::OperationTimeout {
                        backend: NAME,
                        op: "node request",
                        after: t,
                    }))
            }
        }))
        .await
    }

    async fn release_everywhere(&self, lease: &LeaseRef) -> Vec<Result<ReleaseOutcome, LockError>> {
        self.on_all(|n| n.release(lease)).await
    }
}

fn drift(ttl: Duration) -> Duration {
    ttl / 100 + Duration::from_millis(2)
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
        let sent = Instant::now();
        let results = self.on_all(|n| n.attempt(req, false)).await;
        let mut tokens = Vec::new();
        let mut granted = Vec::new();
        let mut errors = Vec::new();
        for (node, r) in self.nodes.iter().zip(results) {
            match r {
                Ok(a) if a.granted => {
                    tokens.push(a.token);
                    granted.push(node);
                }
                Ok(_) => {}
                Err(e) => errors.push(e),
            }
        }
        let valid_until = sent + req.ttl;
        let ok = tokens.len() >= self.quorum() && Instant::now() + drift(req.ttl) < valid_until;
        if ok {
            let top = tokens.iter().copied().max().unwrap_or(0);
            // The floor goes to the granting nodes only (a majority): a node that did not
            // answer the first round would only make the second wait for its timeout.
            let t = self.op_timeout;
            let floors = join_all(
                granted
                    .iter()
                    .map(|n| async move { timeout(t, n.raise_floor(&req.key, top)).await }),
            )
            .await;
            let raised = floors.iter().filter(|r| matches!(r, Ok(Ok(())))).count();
            if raised >= self.quorum() && Instant::now() + drift(req.ttl) < valid_until {
                return Ok(Grant::ttl(FencingToken::new(top), valid_until));
            }
        }
        self.release_everywhere(&req.lease()).await;
        if tokens.len() + errors.len() >= self.quorum() && errors.len() >= self.quorum() {
            // Not contention: too many nodes failed to answer.
            let first = errors
                .into_iter()
                .next()
                .map(|e| e.to_string())
                .unwrap_or_default();
            return Err(LockError::backend(
                NAME,
                true,
                format!(
                    "no majority of {} nodes answered: {first}",
                    self.nodes.len()
                ),
            ));
        }
        Err(LockError::Contended {
            key: req.key.to_string(),
        })
    }

    async fn renew(&self, lease: &LeaseRef, ttl: Duration) -> Result<Instant, LockError> {
        let sent = Instant::now();
        let results = self.on_all(|n| n.renew(lease, ttl)).await;
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
        let results = self.release_everywhere(lease).await;
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
        let results = self.on_all(|n| n.inspect(key)).await;
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
