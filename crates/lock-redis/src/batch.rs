//! Acquires and releases go to the server through one script that takes several at once.
//!
//! A call that finds a free slot (fewer than [`MAX_IN_FLIGHT`] scripts on their way) runs
//! at once, in the caller's task, as a script of one op: an uncontended client pays
//! nothing for batching. A call that finds every slot busy joins a queue; when a slot frees,
//! the whole queue (up to [`MAX_BATCH`] ops) goes out as one script. Under load the fixed
//! cost of a script call (parsing, running the Lua interpreter, the reply) is shared by all
//! the ops it carries, on the server and in the client.
//!
//! Each op keeps its own semantics: the script runs them in order, each as it would run
//! alone, and one op's error is its own reply. Ops from a cancelled caller are dropped if
//! they have not gone out; a reply that finds its caller gone (an acquire that was sent, then
//! abandoned) is undone: its grant, named by its token, is given back, or its queue entry
//! removed, so an abandoned acquire leaves no grant or queue entry behind, whichever way it
//! raced with the caller's own clean-up. An undo never takes away the grant of another
//! attempt under the same lease, which the caller may count: that grant has another token,
//! and a grant made again to the lease that held the key is not undone but ends with its
//! lease.
//!
//! A batch carries unrelated keys, which a standalone server (the only kind this backend
//! connects to) accepts; a cluster would need one batch per hash slot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lock_core::LockError;
use redis::aio::ConnectionManager;
use redis::{Script, Value};
use tokio::sync::oneshot;

use crate::error::{map_err, NAME};
use crate::scripts::{FENCE_KEEP, MAX_CLOCK_LEAD};

/// Scripts on their way at once. Two keep the connection busy while the next batch fills.
pub(crate) const MAX_IN_FLIGHT: usize = 2;
/// Ops per script at most, so that one script never holds the server for long (a few
/// microseconds per op).
pub(crate) const MAX_BATCH: usize = 128;

/// What an op does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Acquire if free; never queue.
    Try,
    /// Acquire if free (and first in line when fair); else join the queue.
    Wait,
    /// Release a held lease or leave the queue; wake the next live waiter.
    Release,
}

impl Kind {
    fn code(self) -> &'static str {
        match self {
            Kind::Try => "t",
            Kind::Wait => "w",
            Kind::Release => "r",
        }
    }
}

/// One acquire or release.
#[derive(Debug)]
pub(crate) struct Op {
    pub(crate) kind: Kind,
    /// The full lock key ([`crate::scripts::lock_key`]).
    pub(crate) key: String,
    pub(crate) lease: String,
    pub(crate) ttl_ms: u64,
    pub(crate) meta: String,
}

/// What the script answered for one op.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// An acquire's answer.
    Attempt(Attempt),
    /// A release's answer: whether this lease held the key.
    Released(bool),
}

/// An acquire's answer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Attempt {
    pub(crate) outcome: Outcome,
    /// The token (granted only).
    pub(crate) token: u64,
    /// Remaining lease of the holder (ms), or -1/-2 when unknown or free; for `SitsOut`,
    /// how long the node still sits out.
    pub(crate) pttl: i64,
    /// Granted again to the lease that held the key (a repeated attempt).
    pub(crate) again: bool,
}

/// How an acquire went on one server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Granted,
    Refused,
    /// A Redlock node whose lock data began less than the longest lease ago.
    SitsOut,
    /// The lock key holds a value this library did not write (one without an expiry).
    Foreign,
}

/// An op's reply.
pub(crate) type Reply = Result<Answer, LockError>;

/// What every script call of one backend sends besides its ops.
#[derive(Debug, Clone)]
pub(crate) struct Params {
    pub(crate) fair: bool,
    pub(crate) waiter_ttl: Duration,
    /// Redlock: the longest lease (ms), for which a node that lost its data sits out; zero
    /// off. Shared by a Redlock's nodes, and raised to the longest a node's marker records:
    /// a client configured with a shorter one than others' must not let a node that lost
    /// their leases sit out less.
    pub(crate) sit_out: Arc<AtomicU64>,
    pub(crate) marker: String,
}

struct Queued {
    op: Op,
    tx: oneshot::Sender<Reply>,
}

#[derive(Default)]
struct State {
    in_flight: usize,
    queue: Vec<Queued>,
}

/// The batching executor of one backend (one connection).
pub(crate) struct Batcher {
    conn: ConnectionManager,
    script: Script,
    params: Params,
    state: Mutex<State>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("Batcher")
            .field("in_flight", &st.in_flight)
            .field("queued", &st.queue.len())
            .finish()
    }
}

impl Batcher {
    pub(crate) fn new(conn: ConnectionManager, script: Script, params: Params) -> Self {
        Self {
            conn,
            script,
            params,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `op`, alone or in a batch, and returns its reply.
    pub(crate) async fn submit(self: &Arc<Self>, op: Op) -> Reply {
        let rx = match self.enter(op) {
            Entry::Alone(op) => {
                let slot = Slot(self.clone());
                let reply = self.run(std::slice::from_ref(&op)).await;
                drop(slot);
                return reply.and_then(|mut v| v.pop().unwrap_or_else(|| Err(short(0, 1))));
            }
            Entry::Queued(rx) => rx,
        };
        rx.await.unwrap_or_else(|_| {
            Err(LockError::backend(
                NAME,
                true,
                "the batch carrying this operation was abandoned (its runtime shut down)",
            ))
        })
    }

    /// Takes a free slot for `op`, or queues it (and starts the queue if a slot is free).
    fn enter(self: &Arc<Self>, op: Op) -> Entry {
        let mut st = self.lock();
        if st.in_flight < MAX_IN_FLIGHT && st.queue.is_empty() {
            st.in_flight += 1;
            return Entry::Alone(op);
        }
        let (tx, rx) = oneshot::channel();
        st.queue.push(Queued { op, tx });
        if st.in_flight < MAX_IN_FLIGHT {
            st.in_flight += 1;
            let batch = take(&mut st.queue);
            drop(st);
            self.spawn_drain(batch);
        }
        Entry::Queued(rx)
    }

    /// Sends `ops` as one script and returns one reply per op.
    async fn run(&self, ops: &[Op]) -> Result<Vec<Reply>, LockError> {
        let p = &self.params;
        let client_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let mut inv = self.script.prepare_invoke();
        for op in ops {
            inv.key(&op.key);
        }
        inv.arg(if p.fair { "1" } else { "0" })
            .arg(p.waiter_ttl.as_millis() as u64)
            .arg(client_ms as u64)
            .arg(FENCE_KEEP.as_millis() as u64)
            .arg(p.sit_out.load(Ordering::Relaxed))
            .arg(&p.marker)
            .arg(MAX_CLOCK_LEAD.as_millis() as u64);
        for op in ops {
            inv.arg(op.kind.code())
                .arg(&op.lease)
                .arg(op.ttl_ms)
                .arg(&op.meta);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = inv.invoke_async(&mut conn).await.map_err(map_err)?;
        let (longest, replies) = split(reply, ops)?;
        let cap = lock_core::options::MAX_LEASE.as_millis() as u64;
        let learned = u64::try_from(longest).unwrap_or(0).min(cap);
        let before = p.sit_out.fetch_max(learned, Ordering::Relaxed);
        if before > 0 && learned > before {
            tracing::warn!(
                own_ms = before,
                marker_ms = learned,
                "a Redlock node names a longer max_lease than this client's: asking every node \
                 to sit out that long after losing its data (give every client the same)"
            );
        }
        Ok(replies)
    }

    /// Starts a task that sends `batch`, then whatever queued meanwhile, until the queue is
    /// empty; the caller has counted it in `in_flight`.
    fn spawn_drain(self: &Arc<Self>, batch: Vec<Queued>) {
        let this = self.clone();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime to run it on: fail the ops (their callers see a retryable error).
            self.lock().in_flight -= 1;
            return;
        };
        rt.spawn(async move {
            let mut batch = batch;
            loop {
                this.send(batch).await;
                match this.next_batch() {
                    Some(b) => batch = b,
                    None => return,
                }
            }
        });
    }

    /// The next batch for a draining task, or `None` (and its slot freed) if none is queued.
    fn next_batch(&self) -> Option<Vec<Queued>> {
        let mut st = self.lock();
        if st.queue.is_empty() {
            st.in_flight -= 1;
            return None;
        }
        Some(take(&mut st.queue))
    }

    /// Sends one batch and hands out the replies; undoes acquires whose caller left.
    async fn send(self: &Arc<Self>, batch: Vec<Queued>) {
        // An acquire whose caller already left is not sent at all.
        let batch: Vec<Queued> = batch
            .into_iter()
            .filter(|q| q.op.kind == Kind::Release || !q.tx.is_closed())
            .collect();
        if batch.is_empty() {
            return;
        }
        let (ops, txs): (Vec<Op>, Vec<_>) = batch.into_iter().map(|q| (q.op, q.tx)).unzip();
        let replies = match self.run(&ops).await {
            Ok(r) => r,
            Err(e) => {
                let why = e.to_string();
                let retryable = e.is_retryable();
                ops.iter()
                    .map(|_| Err(LockError::backend(NAME, retryable, why.clone())))
                    .collect()
            }
        };
        let mut undo = Vec::new();
        for ((op, tx), reply) in ops.into_iter().zip(txs).zip(replies) {
            // The caller may have tried again under the same lease meanwhile, and counts
            // that attempt's grant: an undo names the token of the grant it gives back, and
            // a grant made again is not undone (it may be the one counted, whichever of the
            // two attempts the server ran first); it ends with its lease.
            let only = match &reply {
                Ok(Answer::Attempt(a)) if a.outcome == Outcome::Granted && !a.again => {
                    a.token.to_string()
                }
                Ok(Answer::Attempt(a)) if a.outcome != Outcome::Granted => "0".to_owned(),
                _ => String::new(),
            };
            if tx.send(reply).is_err() && !only.is_empty() {
                undo.push(Op {
                    kind: Kind::Release,
                    ttl_ms: 0,
                    meta: only,
                    ..op
                });
            }
        }
        if !undo.is_empty() {
            tracing::debug!(ops = undo.len(), "releasing acquires whose callers left");
            // Best effort: a lease not released here still ends at its expiry, and a queue
            // entry when its waiter key does.
            let _ = self.run(&undo).await;
        }
    }
}

enum Entry {
    Alone(Op),
    Queued(oneshot::Receiver<Reply>),
}

/// A slot held by an op running in its caller's task; freeing it starts the queue.
struct Slot(Arc<Batcher>);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        if st.queue.is_empty() {
            st.in_flight -= 1;
            return;
        }
        let batch = take(&mut st.queue);
        drop(st);
        self.0.spawn_drain(batch);
    }
}

fn take(queue: &mut Vec<Queued>) -> Vec<Queued> {
    if queue.len() <= MAX_BATCH {
        std::mem::take(queue)
    } else {
        queue.drain(..MAX_BATCH).collect()
    }
}

fn short(got: usize, want: usize) -> LockError {
    LockError::Protocol(format!(
        "batch script returned {got} replies for {want} operations"
    ))
}

/// Splits the script's flat reply into the marker's longest sit-out (ms) and one reply per
/// op: `status, token, pttl` for an acquire, `released` for a release, `-1, message` for an
/// op's own error.
fn split(reply: Vec<Value>, ops: &[Op]) -> Result<(i64, Vec<Reply>), LockError> {
    let mut items = reply.into_iter();
    let longest = int(items.next(), 0, ops.len())?;
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        let first = int(items.next(), out.len(), ops.len())?;
        if first == -1 {
            let msg = match items.next() {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
                Some(Value::SimpleString(s)) => s,
                other => format!("{other:?}"),
            };
            out.push(Err(LockError::backend(NAME, false, msg)));
            continue;
        }
        let answer = match op.kind {
            Kind::Release => Answer::Released(first == 1),
            Kind::Try | Kind::Wait => {
                let outcome = match first {
                    1 | 3 => Outcome::Granted,
                    0 => Outcome::Refused,
                    2 => Outcome::SitsOut,
                    4 => Outcome::Foreign,
                    n => return Err(LockError::Protocol(format!("acquire status {n}"))),
                };
                let token = match items.next() {
                    Some(Value::BulkString(b)) => std::str::from_utf8(&b)
                        .ok()
                        .and_then(|t| t.parse::<u64>().ok()),
                    _ => None,
                }
                .ok_or_else(|| LockError::Protocol("acquire reply without a token".into()))?;
                let pttl = int(items.next(), out.len(), ops.len())?;
                Answer::Attempt(Attempt {
                    outcome,
                    token,
                    pttl,
                    again: first == 3,
                })
            }
        };
        out.push(Ok(answer));
    }
    if let Some(extra) = items.next() {
        return Err(LockError::Protocol(format!(
            "batch script returned more than {} replies (next: {extra:?})",
            ops.len()
        )));
    }
    Ok((longest, out))
}

/// One integer of op `at`'s reply.
fn int(v: Option<Value>, at: usize, ops: usize) -> Result<i64, LockError> {
    match v {
        Some(Value::Int(n)) => Ok(n),
        None => Err(short(at, ops)),
        Some(other) => Err(LockError::Protocol(format!(
            "batch reply item holds {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: Kind) -> Op {
        Op {
            kind,
            key: "k".into(),
            lease: "l".into(),
            ttl_ms: 1000,
            meta: String::new(),
        }
    }

    fn tok(t: &str) -> Value {
        Value::BulkString(t.as_bytes().to_vec())
    }

    #[test]
    fn split_reads_each_op_at_its_width_and_errors_alone() {
        let ops = [
            op(Kind::Wait),
            op(Kind::Release),
            op(Kind::Try),
            op(Kind::Release),
            op(Kind::Try),
        ];
        let reply = vec![
            Value::Int(3000),
            Value::Int(1),
            tok("18446744073709551615"),
            Value::Int(1000),
            Value::Int(0),
            Value::Int(-1),
            Value::BulkString(b"WRONGTYPE Operation against a key".to_vec()),
            Value::Int(1),
            Value::Int(2),
            tok("0"),
            Value::Int(700),
        ];
        let (longest, out) = split(reply, &ops).expect("well-formed reply");
        assert_eq!(longest, 3000);
        assert_eq!(out.len(), 5);
        assert_eq!(
            out[0].as_ref().ok(),
            Some(&Answer::Attempt(Attempt {
                outcome: Outcome::Granted,
                token: u64::MAX,
                pttl: 1000,
                again: false,
            }))
        );
        assert_eq!(out[1].as_ref().ok(), Some(&Answer::Released(false)));
        let err = out[2].as_ref().expect_err("the third op failed alone");
        assert!(err.to_string().contains("WRONGTYPE"), "{err}");
        assert_eq!(out[3].as_ref().ok(), Some(&Answer::Released(true)));
        assert!(matches!(
            out[4].as_ref().ok(),
            Some(Answer::Attempt(Attempt {
                outcome: Outcome::SitsOut,
                pttl: 700,
                ..
            }))
        ));
    }

    #[test]
    fn split_refuses_short_long_and_odd_replies() {
        let ops = [op(Kind::Try), op(Kind::Release)];
        // Each starts with the marker's longest sit-out.
        let short = vec![Value::Int(0), Value::Int(1), tok("7"), Value::Int(10)];
        assert!(matches!(split(short, &ops), Err(LockError::Protocol(_))));
        let long = vec![
            Value::Int(0),
            Value::Int(1),
            tok("7"),
            Value::Int(10),
            Value::Int(1),
            Value::Int(1),
        ];
        assert!(matches!(split(long, &ops), Err(LockError::Protocol(_))));
        let odd = vec![
            Value::Int(0),
            Value::Int(1),
            Value::Nil,
            Value::Int(10),
            Value::Int(1),
        ];
        assert!(matches!(split(odd, &ops), Err(LockError::Protocol(_))));
        assert!(matches!(
            split(Vec::new(), &ops),
            Err(LockError::Protocol(_))
        ));
        let too_big = vec![
            Value::Int(0),
            Value::Int(1),
            tok("18446744073709551616"),
            Value::Int(10),
        ];
        assert!(matches!(
            split(too_big, &ops[..1]),
            Err(LockError::Protocol(_))
        ));
    }
}
