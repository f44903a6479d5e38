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
//! abandoned) is undone by a release of that lease, so an abandoned acquire never leaves
//! a grant or a queue entry behind, whichever way it raced with the caller's own clean-up.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lock_core::LockError;
use redis::aio::ConnectionManager;
use redis::{ErrorKind, Script, ServerErrorKind, Value};
use tokio::sync::oneshot;

use crate::single::{map_err, NAME};

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

    /// The integers in this op's reply (an error is always `-1, message`).
    fn width(self) -> usize {
        match self {
            Kind::Try | Kind::Wait => 3,
            Kind::Release => 1,
        }
    }
}

/// One acquire or release.
#[derive(Debug)]
pub(crate) struct Op {
    pub(crate) kind: Kind,
    /// The full lock key (namespace included).
    pub(crate) key: String,
    pub(crate) lease: String,
    pub(crate) ttl_ms: u64,
    pub(crate) meta: String,
}

/// An op's reply: the integers the script returned for it.
pub(crate) type Reply = Result<Vec<i64>, LockError>;

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
    fair: bool,
    waiter_ttl: Duration,
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
    pub(crate) fn new(
        conn: ConnectionManager,
        script: Script,
        fair: bool,
        waiter_ttl: Duration,
    ) -> Self {
        Self {
            conn,
            script,
            fair,
            waiter_ttl,
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
    ///
    /// The `EVALSHA` is built as one command buffer, sized up front, rather than through
    /// `Script::prepare_invoke` (which allocates a buffer per key and argument, then copies
    /// them all into the command): a batch of 20 ops is 100 arguments.
    async fn run(&self, ops: &[Op]) -> Result<Vec<Reply>, LockError> {
        let hash = self.script.get_hash();
        let data = hash.len()
            + 32
            + ops
                .iter()
                .map(|op| op.key.len() + op.lease.len() + op.meta.len() + 24)
                .sum::<usize>();
        let mut cmd = redis::Cmd::with_capacity(5 + 5 * ops.len(), data);
        cmd.arg("EVALSHA").arg(hash).arg(ops.len());
        for op in ops {
            cmd.arg(&op.key);
        }
        cmd.arg(if self.fair { "1" } else { "0" })
            .arg(self.waiter_ttl.as_millis() as u64);
        for op in ops {
            cmd.arg(op.kind.code())
                .arg(&op.lease)
                .arg(op.ttl_ms)
                .arg(&op.meta);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = match cmd.query_async(&mut conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                // The server lost its script cache (a restart, SCRIPT FLUSH): load the
                // script and send the same command again.
                self.script.load_async(&mut conn).await.map_err(map_err)?;
                cmd.query_async(&mut conn).await.map_err(map_err)?
            }
            other => other.map_err(map_err)?,
        };
        split(reply, ops)
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
            let sent_back = reply.is_ok();
            if tx.send(reply).is_err() && sent_back && op.kind != Kind::Release {
                undo.push(Op {
                    kind: Kind::Release,
                    ttl_ms: 0,
                    meta: String::new(),
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

/// Splits the script's flat reply into one reply per op: `granted, token, pttl` for an
/// acquire, `released` for a release, `-1, message` for an op's own error.
fn split(reply: Vec<Value>, ops: &[Op]) -> Result<Vec<Reply>, LockError> {
    let mut items = reply.into_iter();
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
        let mut r = Vec::with_capacity(op.kind.width());
        r.push(first);
        for _ in 1..op.kind.width() {
            r.push(int(items.next(), out.len(), ops.len())?);
        }
        out.push(Ok(r));
    }
    if let Some(extra) = items.next() {
        return Err(LockError::Protocol(format!(
            "batch script returned more than {} replies (next: {extra:?})",
            ops.len()
        )));
    }
    Ok(out)
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

    #[test]
    fn split_reads_each_op_at_its_width_and_errors_alone() {
        let ops = [
            op(Kind::Wait),
            op(Kind::Release),
            op(Kind::Try),
            op(Kind::Release),
        ];
        let reply = vec![
            Value::Int(1),
            Value::Int(42),
            Value::Int(1000),
            Value::Int(0),
            Value::Int(-1),
            Value::BulkString(b"WRONGTYPE Operation against a key".to_vec()),
            Value::Int(1),
        ];
        let out = split(reply, &ops).expect("well-formed reply");
        assert_eq!(out.len(), 4);
        assert_eq!(out[0].as_ref().ok(), Some(&vec![1, 42, 1000]));
        assert_eq!(out[1].as_ref().ok(), Some(&vec![0]));
        let err = out[2].as_ref().expect_err("the third op failed alone");
        assert!(err.to_string().contains("WRONGTYPE"), "{err}");
        assert_eq!(out[3].as_ref().ok(), Some(&vec![1]));
    }

    #[test]
    fn split_refuses_short_long_and_odd_replies() {
        let ops = [op(Kind::Try), op(Kind::Release)];
        let short = vec![Value::Int(1), Value::Int(7), Value::Int(10)];
        assert!(matches!(split(short, &ops), Err(LockError::Protocol(_))));
        let long = vec![
            Value::Int(1),
            Value::Int(7),
            Value::Int(10),
            Value::Int(1),
            Value::Int(1),
        ];
        assert!(matches!(split(long, &ops), Err(LockError::Protocol(_))));
        let odd = vec![Value::Int(1), Value::Nil, Value::Int(10), Value::Int(1)];
        assert!(matches!(split(odd, &ops), Err(LockError::Protocol(_))));
    }
}
