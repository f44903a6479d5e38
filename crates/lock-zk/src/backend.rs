//! The ZooKeeper lock backend.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lock_core::{
    AcquireRequest, Capabilities, FencingToken, Grant, HolderMeta, LeaseId, LeaseKind, LeaseRef,
    LockBackend, LockError, LockInfo, LockKey, LossReason, ReleaseOutcome, SessionHealth,
};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::error::Elapsed;
use tokio::time::Instant;
use zookeeper_client as zk;

use crate::config::{ZkAcl, ZkConfig};
use crate::path::{escape_key, lease_of, node_prefix, sequence_of};

pub(crate) const NAME: &str = "zk";

/// The pause before a waiter asks again after a slow or lost answer.
const ASK_AGAIN_AFTER: Duration = Duration::from_millis(50);

fn map_err(e: zk::Error) -> LockError {
    match e {
        zk::Error::NoAuth | zk::Error::AuthFailed => {
            LockError::InvalidConfig(format!("ZooKeeper refused access: {e}"))
        }
        zk::Error::InvalidAcl | zk::Error::BadArguments(_) => {
            LockError::InvalidConfig(format!("ZooKeeper rejected the request: {e}"))
        }
        e if transient(&e) => LockError::backend(NAME, true, e),
        other => LockError::backend(NAME, false, other),
    }
}

/// Errors that say nothing about the request itself: it may or may not have been applied.
fn transient(e: &zk::Error) -> bool {
    matches!(
        e,
        zk::Error::ConnectionLoss
            // The library fails the requests in flight on a failed connection with a
            // custom error (no answer within its timeout, an I/O error).
            | zk::Error::Custom(_)
            | zk::Error::Timeout
            | zk::Error::NoHosts
            | zk::Error::SessionExpired
            | zk::Error::SessionMoved
            | zk::Error::ClientClosed
            | zk::Error::Throttled
            | zk::Error::NotReadOnly
    )
}

/// One ZooKeeper session. Never reused once it ended or was declared lost.
///
/// The library closes a session (CloseSession, which deletes its ephemeral nodes) only when
/// every clone of its `Client` is gone: everything that holds a clone (waiting acquires,
/// the monitors of held locks) lets it go when the session is killed.
#[derive(Debug)]
struct Session {
    client: Mutex<Option<zk::Client>>,
    id: i64,
    timeout: Duration,
    dead: AtomicBool,
    killed: watch::Sender<bool>,
}

impl Session {
    fn client(&self) -> Result<zk::Client, LockError> {
        self.client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| LockError::backend(NAME, true, "the ZooKeeper session was closed"))
    }

    fn usable(&self) -> bool {
        if self.dead.load(Ordering::Acquire) {
            return false;
        }
        match self
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            Some(c) => !matches!(
                c.state(),
                zk::SessionState::Expired | zk::SessionState::Closed | zk::SessionState::AuthFailed
            ),
            None => false,
        }
    }

    /// Gives the session up: it is closed (or, if the server cannot be reached, expires
    /// there), which removes every ephemeral node it owns. Everything waiting on it lets
    /// its clone of the client go.
    fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        drop(self.client.lock().unwrap_or_else(|p| p.into_inner()).take());
        self.killed.send_replace(true);
    }

    /// Resolves when the session is killed.
    async fn killed(&self) {
        let mut rx = self.killed.subscribe();
        let _ = rx.wait_for(|k| *k).await;
    }
}

#[derive(Debug)]
struct Held {
    session: Arc<Session>,
    path: String,
    monitor: JoinHandle<()>,
    /// Until when the monitor's last answered check keeps the session (see
    /// `confirmed_until`); shared with the monitor.
    until: Arc<Mutex<Instant>>,
}

impl Held {
    /// Whether the session went unconfirmed until its deadline: declared lost, as the
    /// monitor (which a release stops) would have.
    fn expired(&self) -> bool {
        *self.until.lock().unwrap_or_else(|p| p.into_inner()) <= Instant::now()
    }
}

#[derive(Debug)]
struct Inner {
    cfg: ZkConfig,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    held: Mutex<HashMap<LeaseId, Held>>,
    wakeups: AtomicU64,
    watches: AtomicU64,
}

/// A lock backend on ZooKeeper (the Curator recipe: ephemeral sequential nodes, each
/// waiter watching only its predecessor).
///
/// The session is the lease: a lock lives while its session does. Each held lock checks
/// its node, after a `sync` through the leader, every eighth of the negotiated session
/// timeout; an answer to a check sent at `t` keeps the guard's safe deadline at `t` plus
/// half the timeout (the leader cannot expire the session before then). When the
/// connection drops or a check goes unanswered, the guard turns `Uncertain`; if a check
/// finds the node still owned by this session, `Held` again; if the node is gone, or the deadline
/// passes unconfirmed, `Lost`, before the server can expire the session and grant the
/// lock to the next waiter. A session declared lost is closed and never reused.
#[derive(Clone, Debug)]
pub struct ZkBackend {
    inner: Arc<Inner>,
}

/// Deletes an acquire's lock node if the acquire does not finish (cancelled, timed out,
/// failed). Armed before the create is sent: until the create is answered, the node is
/// looked for by its lease.
struct NodeGuard {
    session: Arc<Session>,
    node: Option<Node>,
    op: Duration,
}

/// A lock node: its path, or, while its create is unanswered, the key's parent and the
/// prefix of this lease's node names (a lease has at most one node: see `create_node`).
#[derive(Clone)]
enum Node {
    Path(String),
    OfLease { parent: String, prefix: String },
}

impl NodeGuard {
    /// The created node's path, from now on.
    fn created(&mut self, path: &str) {
        self.node = Some(Node::Path(path.to_owned()));
    }

    fn disarm(mut self) {
        self.node = None;
    }
}

impl Drop for NodeGuard {
    fn drop(&mut self) {
        if let (Some(node), Ok(client)) = (self.node.take(), self.session.client()) {
            drop(delete_node(
                client,
                node,
                self.op,
                Some(self.session.clone()),
            ));
        }
    }
}

/// The first try of [`delete_node`]: ZooKeeper's answer, or `Err` if none came within the
/// operation timeout.
type FirstDelete = oneshot::Receiver<Result<Result<(), zk::Error>, Elapsed>>;

/// Deletes lock node `node` in a task of its own, which goes on when its caller stops
/// waiting: a node this process let go would otherwise stay on the live session, with
/// nothing watching it, and block the key. With `retry` (the node's session), a delete that
/// fails is tried again for a session timeout; if it still fails the session is closed,
/// which removes the node (and ends the session's other locks, which their guards report).
fn delete_node(
    client: zk::Client,
    mut node: Node,
    op: Duration,
    retry: Option<Arc<Session>>,
) -> FirstDelete {
    let (tx, first) = oneshot::channel();
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        // No runtime to run it: the node goes when the session ends.
        return first;
    };
    rt.spawn(async move {
        let deleted = delete_once(&client, &mut node, op).await;
        // A session given up meanwhile must not be kept open by this clone.
        drop(client);
        let done = matches!(deleted, Ok(Ok(()) | Err(zk::Error::NoNode)));
        let _ = tx.send(deleted);
        let Some(session) = retry.filter(|_| !done) else {
            return;
        };
        let until = Instant::now() + session.timeout;
        let mut pause = Duration::from_millis(50);
        while Instant::now() < until {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(session.timeout / 4);
            let Ok(client) = session.client() else {
                return;
            };
            let deleted = delete_once(&client, &mut node, op).await;
            if let Ok(Ok(()) | Err(zk::Error::NoNode)) = deleted {
                return;
            }
        }
        session.kill();
    });
    first
}

/// One try at deleting `node`, within `op`; a node known only by its lease is looked up
/// first (none found, or the lookup refused other than by a failed connection: nothing
/// known to delete).
async fn delete_once(
    client: &zk::Client,
    node: &mut Node,
    op: Duration,
) -> Result<Result<(), zk::Error>, Elapsed> {
    tokio::time::timeout(op, async {
        if let Node::OfLease { parent, prefix } = node.clone() {
            // Through the leader: a lagging server may not show the create yet.
            let children = match client.sync(&parent).await {
                Ok(()) => client.list_children(&parent).await,
                Err(e) => Err(e),
            };
            let names = match children {
                Ok(names) => names,
                Err(e) if transient(&e) => return Err(e),
                Err(_) => return Ok(()),
            };
            // Only this session's node: a retry of the acquire on a newer session has a node
            // of the same lease.
            let mut found = None;
            for name in names.into_iter().filter(|n| n.starts_with(&prefix)) {
                let path = format!("{parent}/{name}");
                match client.check_stat(&path).await {
                    Ok(Some(stat)) if stat.ephemeral_owner == client.session_id().0 => {
                        found = Some(path);
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if transient(&e) => return Err(e),
                    Err(_) => {}
                }
            }
            let Some(path) = found else {
                return Ok(());
            };
            *node = Node::Path(path);
        }
        match node {
            Node::Path(path) => client.delete(path, None).await,
            Node::OfLease { .. } => Ok(()),
        }
    })
    .await
}

impl ZkBackend {
    /// Connects to `connect` (`host:port[,host:port...][/chroot]`) with default settings.
    pub async fn connect(connect: &str) -> Result<Self, LockError> {
        Self::connect_with(ZkConfig::new(connect)).await
    }

    /// Connects with explicit settings (opens the session, creates the root path).
    pub async fn connect_with(cfg: ZkConfig) -> Result<Self, LockError> {
        cfg.validate()?;
        let me = Self {
            inner: Arc::new(Inner {
                cfg,
                session: tokio::sync::Mutex::new(None),
                held: Mutex::new(HashMap::new()),
                wakeups: AtomicU64::new(0),
                watches: AtomicU64::new(0),
            }),
        };
        let s = me.session().await?;
        let client = s.client()?;
        let opts = me.dir_options();
        me.bounded("create root", client.mkdir(&me.inner.cfg.root, &opts))
            .await
            .map_err(|e| match e {
                LockError::Backend { .. } if me.inner.cfg.addresses().1.is_some() => {
                    LockError::InvalidConfig(format!(
                        "cannot create {} under the chroot of {:?} (does the chroot exist?): {e}",
                        me.inner.cfg.root, me.inner.cfg.connect
                    ))
                }
                other => other,
            })?;
        Ok(me)
    }

    /// How many times a waiter was woken by its predecessor's watch (for the herd check:
    /// one per release).
    pub fn watch_wakeups(&self) -> u64 {
        self.inner.wakeups.load(Ordering::Relaxed)
    }

    /// How many watches waiters have set on their predecessors (one per waiter while the
    /// queue stands still).
    pub fn watches_set(&self) -> u64 {
        self.inner.watches.load(Ordering::Relaxed)
    }

    /// The negotiated session timeout of the current session.
    pub async fn session_timeout(&self) -> Result<Duration, LockError> {
        Ok(self.session().await?.timeout)
    }

    /// The current session id.
    pub async fn session_id(&self) -> Result<i64, LockError> {
        Ok(self.session().await?.id)
    }

    /// The parent node of `key`'s lock nodes.
    pub fn key_path(&self, key: &LockKey) -> String {
        format!("{}/{}", self.inner.cfg.root, escape_key(key.as_str()))
    }

    fn acls(&self) -> zk::Acls<'static> {
        match self.inner.cfg.acl {
            ZkAcl::Open => zk::Acls::anyone_all(),
            ZkAcl::CreatorAll => zk::Acls::creator_all(),
        }
    }

    fn dir_options(&self) -> zk::CreateOptions<'static> {
        zk::CreateMode::Persistent.with_acls(self.acls())
    }

    /// Runs a request bounded by the operation timeout; the outer error is the timeout,
    /// the inner result is ZooKeeper's answer.
    async fn timed<T>(
        &self,
        op: &'static str,
        f: impl Future<Output = Result<T, zk::Error>>,
    ) -> Result<Result<T, zk::Error>, LockError> {
        let t = self.inner.cfg.op_timeout;
        tokio::time::timeout(t, f)
            .await
            .map_err(|_| LockError::OperationTimeout {
                backend: NAME,
                op,
                after: t,
            })
    }

    async fn bounded<T>(
        &self,
        op: &'static str,
        f: impl Future<Output = Result<T, zk::Error>>,
    ) -> Result<T, LockError> {
        self.timed(op, f).await?.map_err(map_err)
    }

    /// The current session, or a new one if it ended or was declared lost.
    async fn session(&self) -> Result<Arc<Session>, LockError> {
        let mut cur = self.inner.session.lock().await;
        if let Some(s) = cur.as_ref().filter(|s| s.usable()) {
            return Ok(s.clone());
        }
        let cfg = &self.inner.cfg;
        // The library's own heartbeat: it pings after 3/20 of the session timeout of
        // silence and reports Disconnected after 2/5 of it without an answer.
        let mut connector = zk::Client::connector().with_session_timeout(cfg.session_timeout);
        if let Some(d) = &cfg.digest {
            connector = connector.with_auth("digest", d.as_bytes());
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = crate::tls::options(cfg)? {
            connector = connector.with_tls(tls);
        }
        let failed = |e: LockError| async move {
            #[cfg(feature = "tls")]
            if let Some(why) = crate::tls::diagnose(cfg).await {
                return LockError::InvalidConfig(format!("ZooKeeper TLS: {why}"));
            }
            e
        };
        let client =
            match tokio::time::timeout(cfg.op_timeout, connector.connect(&cfg.connect)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(failed(map_err(e)).await),
                Err(_) => {
                    return Err(failed(LockError::OperationTimeout {
                        backend: NAME,
                        op: "connect",
                        after: cfg.op_timeout,
                    })
                    .await)
                }
            };
        let s = Arc::new(Session {
            id: client.session_id().0,
            timeout: client.session_timeout(),
            client: Mutex::new(Some(client)),
            dead: AtomicBool::new(false),
            killed: watch::channel(false).0,
        });
        *cur = Some(s.clone());
        Ok(s)
    }

    /// Lists the lock nodes under `parent`, in queue order. `None` if the parent is gone.
    async fn queue(
        &self,
        client: &zk::Client,
        parent: &str,
    ) -> Result<Option<Vec<(u64, String)>>, LockError> {
        match self.timed("list", client.list_children(parent)).await? {
            Ok(children) => {
                let mut q: Vec<(u64, String)> = children
                    .into_iter()
                    .filter_map(|n| sequence_of(&n).map(|s| (s, n)))
                    .collect();
                q.sort();
                Ok(Some(q))
            }
            Err(zk::Error::NoNode) => Ok(None),
            Err(e) => Err(map_err(e)),
        }
    }

    /// The node of `lease` under `parent` on this client's session, if there is one (a
    /// create whose answer was lost may have made it): its path and czxid. After a `sync`:
    /// the server this client reconnected to may not have applied the create yet. Only a
    /// node of this session counts: one the lease left on a session given up goes with that
    /// session.
    async fn find_own_node(
        &self,
        client: &zk::Client,
        parent: &str,
        lease: &LeaseId,
    ) -> Result<Option<(String, i64)>, LockError> {
        match self.timed("sync", client.sync(parent)).await? {
            Ok(()) | Err(zk::Error::NoNode) => {}
            Err(e) => return Err(map_err(e)),
        }
        let prefix = node_prefix(lease.as_str());
        let queue = self.queue(client, parent).await?.unwrap_or_default();
        for (_, name) in queue.iter().filter(|(_, n)| n.starts_with(&prefix)) {
            let full = format!("{parent}/{name}");
            match self.timed("stat", client.check_stat(&full)).await? {
                Ok(Some(stat)) if stat.ephemeral_owner == client.session_id().0 => {
                    return Ok(Some((full, stat.czxid)))
                }
                Ok(_) => {}
                Err(e) => return Err(map_err(e)),
            }
        }
        Ok(None)
    }

    /// Creates this request's lock node (and the key's container parent), surviving a
    /// connection loss during create by finding the node by its lease id. Returns the
    /// node's path and its czxid.
    async fn create_node(
        &self,
        client: &zk::Client,
        req: &AcquireRequest,
    ) -> Result<(String, i64), LockError> {
        let parent = self.key_path(&req.key);
        let path = format!("{parent}/{}", node_prefix(req.lease_id.as_str()));
        let data = format!("{}\n{}", req.lease_id, req.meta.encode());
        let acls = self.acls();
        let node_opts = zk::CreateMode::EphemeralSequential.with_acls(acls);
        let parent_opts = zk::CreateMode::Container.with_acls(acls);
        let mut last = String::new();
        // After a create whose outcome is unknown, look for the node (by its lease id, after a
        // `sync`: a lagging server may not show it yet) before creating another: a second
        // node of this lease would queue behind the first and wait for ever.
        let mut unknown = false;
        for _ in 0..8 {
            if unknown {
                match self.find_own_node(client, &parent, &req.lease_id).await {
                    Ok(Some(found)) => return Ok(found),
                    Ok(None) => {}
                    Err(e) if e.is_retryable() => {
                        last = format!("the lock node could not be looked for: {e}");
                        tokio::time::sleep(ASK_AGAIN_AFTER).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let res = self
                .timed("create", client.create(&path, data.as_bytes(), &node_opts))
                .await;
            match res {
                Ok(Ok((stat, seq))) => return Ok((format!("{path}{seq}"), stat.czxid)),
                Ok(Err(zk::Error::NoNode)) => {
                    // The key's parent does not exist (first use, or the server removed the
                    // empty container): create it and try again.
                    match self
                        .timed("create parent", client.create(&parent, &[], &parent_opts))
                        .await?
                    {
                        Ok(_) | Err(zk::Error::NodeExists) => {}
                        Err(zk::Error::NoNode) => {
                            self.bounded(
                                "create root",
                                client.mkdir(&self.inner.cfg.root, &self.dir_options()),
                            )
                            .await?
                        }
                        Err(e) => return Err(map_err(e)),
                    }
                    last = "the key's parent node kept disappearing".into();
                }
                Ok(Err(e)) if transient(&e) => {
                    unknown = true;
                    last = format!("the connection failed during create: {e}");
                }
                Err(e @ LockError::OperationTimeout { .. }) => {
                    unknown = true;
                    last = e.to_string();
                }
                Ok(Err(e)) => return Err(map_err(e)),
                Err(e) => return Err(e),
            }
        }
        Err(LockError::backend(
            NAME,
            true,
            format!("could not create the lock node: {last}"),
        ))
    }
}

impl ZkBackend {
    /// Acquires on the current session; if that session ends (expired, or given up by
    /// another lock's monitor) while this waits, starts over on a new one, until the
    /// deadline.
    async fn attempt(
        &self,
        req: &AcquireRequest,
        wait: Option<Option<Instant>>,
    ) -> Result<Grant, LockError> {
        let started = Instant::now();
        loop {
            let session = self.session().await?;
            match self.attempt_on(&session, req, wait, started).await {
                Err(e) if !session.usable() && wait.is_some() => {
                    let before_deadline = wait.flatten().is_none_or(|d| Instant::now() < d);
                    if !before_deadline {
                        return Err(e);
                    }
                    tracing::debug!(key = %req.key, error = %e, "the session ended while waiting; waiting again on a new one");
                }
                other => return other,
            }
        }
    }

    /// One acquire on `session`: `wait` None = try once; Some(deadline) = queue and wait.
    async fn attempt_on(
        &self,
        session: &Arc<Session>,
        req: &AcquireRequest,
        wait: Option<Option<Instant>>,
        started: Instant,
    ) -> Result<Grant, LockError> {
        let session = session.clone();
        let client = session.client()?;
        let parent = self.key_path(&req.key);
        if wait.is_none() {
            // A try on a key with a queue cannot win: answer without writing. Reads may be
            // served by a follower that lags behind a release another client already saw
            // acknowledged; `sync` first, so a released key is never reported taken.
            match self.timed("sync", client.sync(&parent)).await? {
                Ok(()) | Err(zk::Error::NoNode) => {}
                Err(e) => return Err(map_err(e)),
            }
            if self
                .queue(&client, &parent)
                .await?
                .is_some_and(|q| !q.is_empty())
            {
                return Err(LockError::contended(&req.key));
            }
        }
        let mut guard = NodeGuard {
            session: session.clone(),
            node: Some(Node::OfLease {
                parent: parent.clone(),
                prefix: node_prefix(req.lease_id.as_str()),
            }),
            op: self.inner.cfg.op_timeout,
        };
        // A session given up meanwhile must not be kept open by this create's client clone.
        let create_sent = Instant::now();
        let (path, czxid) = tokio::select! {
            created = self.create_node(&client, req) => created?,
            () = session.killed() => return Err(LockError::backend(
                NAME,
                true,
                "the session was given up while creating the lock node",
            )),
        };
        guard.created(&path);
        let name = path.rsplit('/').next().unwrap_or_default().to_owned();
        // While waiting, a slow or lost answer does not cost the node its place: it stays in
        // the queue as long as the session lives, so ask again (a dead session ends the wait).
        let ask_again = |e: &LockError| {
            e.is_retryable()
                && session.usable()
                && wait.is_some_and(|d| d.is_none_or(|d| Instant::now() < d))
        };
        let mut first = true;
        loop {
            // A grant's deadline counts from a moment the answering server followed the
            // leader (see `confirmed_until`): the create, a write, proves it for the first
            // look; a later look (after a wait) syncs first.
            let asked = if std::mem::take(&mut first) {
                create_sent
            } else {
                let asked = Instant::now();
                match self
                    .timed("sync", client.sync(&parent))
                    .await
                    .and_then(|r| r.map_err(map_err))
                {
                    Ok(()) => {}
                    Err(e) if ask_again(&e) => {
                        tokio::time::sleep(ASK_AGAIN_AFTER).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                asked
            };
            let queue = match self.queue(&client, &parent).await {
                Ok(q) => q.unwrap_or_default(),
                Err(e) if ask_again(&e) => {
                    tokio::time::sleep(ASK_AGAIN_AFTER).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let Some(pos) = queue.iter().position(|(_, n)| *n == name) else {
                // Our node is gone: the session expired while we waited.
                return Err(LockError::backend(
                    NAME,
                    true,
                    "the lock node disappeared while waiting (session expired?)",
                ));
            };
            if pos == 0 {
                guard.disarm();
                let token = u64::try_from(czxid)
                    .map_err(|_| LockError::Protocol(format!("negative czxid {czxid}")))?;
                return Ok(self.hold(
                    req.lease_id.clone(),
                    session,
                    path,
                    FencingToken::new(token),
                    asked,
                ));
            }
            let Some(deadline) = wait else {
                // A try that found a queue after all.
                let answer = LockError::contended(&req.key);
                return Err(self.leave_queue(&client, guard, &path, answer).await);
            };
            // Watch only the predecessor (no herd); FIFO by sequence.
            let pred = format!("{parent}/{}", queue[pos - 1].1);
            let watched = self
                .timed("watch", client.check_and_watch_stat(&pred))
                .await
                .and_then(|r| r.map_err(map_err));
            let watcher = match watched {
                Ok((Some(_), w)) => {
                    self.inner.watches.fetch_add(1, Ordering::Relaxed);
                    w
                }
                Ok((None, _)) => continue,
                Err(e) if ask_again(&e) => {
                    tokio::time::sleep(ASK_AGAIN_AFTER).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let timeout = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = watcher.changed() => {
                    if ev.event_type == zk::EventType::Session {
                        return Err(LockError::backend(
                            NAME,
                            true,
                            format!("the session ended while waiting ({:?})", ev.session_state),
                        ));
                    }
                    self.inner.wakeups.fetch_add(1, Ordering::Relaxed);
                }
                () = session.killed() => {
                    // Its nodes go with it; this waiter's client clone must go too, or the
                    // session is never closed.
                    return Err(LockError::backend(
                        NAME,
                        true,
                        "the session was given up while waiting (another lock on it was lost)",
                    ));
                }
                () = timeout => {
                    let answer = LockError::timeout(&req.key, started.elapsed());
                    return Err(self.leave_queue(&client, guard, &path, answer).await);
                }
            }
        }
    }

    /// Takes an acquire's node out of the queue before it answers `answer` (a definite
    /// no). If the delete cannot be confirmed, the guard's background delete takes over as
    /// it drops, and the answer is an unknown outcome, so that the client cleans up by lease
    /// id too: a node left on the live session would block the key once it came first.
    async fn leave_queue(
        &self,
        client: &zk::Client,
        guard: NodeGuard,
        path: &str,
        answer: LockError,
    ) -> LockError {
        let failed = match self.timed("delete", client.delete(path, None)).await {
            Ok(Ok(()) | Err(zk::Error::NoNode)) => {
                guard.disarm();
                return answer;
            }
            Ok(Err(e)) => map_err(e),
            Err(e) => e,
        };
        LockError::backend(
            NAME,
            true,
            format!("could not remove this acquire's queue node before answering: {failed}"),
        )
    }

    fn hold(
        &self,
        lease: LeaseId,
        session: Arc<Session>,
        path: String,
        token: FencingToken,
        asked: Instant,
    ) -> Grant {
        let first = first_deadline(&session, asked);
        let (tx, rx) = watch::channel(SessionHealth::Alive { until: first });
        let until = Arc::new(Mutex::new(first));
        let monitor = tokio::spawn(monitor(
            session.clone(),
            path.clone(),
            tx,
            asked,
            until.clone(),
        ));
        self.held().insert(
            lease,
            Held {
                session,
                path,
                monitor,
                until,
            },
        );
        Grant::session(token, rx)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseId, Held>> {
        self.inner.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Until when the leader certainly keeps a session whose lock node a check sent at `sent`
/// found, after a `sync` (answered only through the leader, so the server in between was
/// still following it). The leader expires a session a timeout after it last heard of it,
/// and hears of a follower's clients only at its pings (every half tick, at most a quarter
/// of the timeout). A held lock's checks, every eighth of the timeout, keep the client from
/// being silent longer than an eighth; so the session lives until at least `sent` + 5/8 of
/// the timeout (1 - 1/4 - 1/8), of which half is used (the rest covers the clocks' rates).
fn confirmed_until(session: &Session, sent: Instant) -> Instant {
    sent + session.timeout / 2
}

/// The deadline of a grant judged from a look sent at `asked`, before the lock's first
/// check: the client library's own pings (after at most a fifth of the timeout of silence)
/// are all that spaced the client's requests before it, so 11/20 of the timeout are
/// certain, of which 2/5 are used.
fn first_deadline(session: &Session, asked: Instant) -> Instant {
    asked + session.timeout * 2 / 5
}

/// Mirrors the session and the lock node into the lock's health, and confirms the node (so
/// the session) every eighth of the session timeout: each answer moves the lock's deadline,
/// and a lock unconfirmed until its deadline closes the session.
/// `asked`: when the request that showed the node first in line was sent (the session was
/// connected since).
async fn monitor(
    session: Arc<Session>,
    path: String,
    tx: watch::Sender<SessionHealth>,
    asked: Instant,
    deadline: Arc<Mutex<Instant>>,
) {
    let ended = |r: String| SessionHealth::Ended(LossReason::SessionEnded(r));
    let Ok(client) = session.client() else {
        tx.send_replace(ended("the session was closed".into()));
        return;
    };
    let mut states = client.state_watcher();
    // The library reports each state once: one reported before this task ran is read here.
    let mut disconnected = match states.peek_state() {
        zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => false,
        zk::SessionState::Disconnected => {
            tx.send_replace(SessionHealth::Suspended);
            true
        }
        other => {
            tx.send_replace(ended(format!("the ZooKeeper session is {other:?}")));
            return;
        }
    };
    let node_watch = |c: zk::Client, p: String| async move {
        match c.check_and_watch_stat(&p).await {
            Ok((Some(_), w)) => Some(w.changed().await),
            Ok((None, _)) => None,
            Err(_) => std::future::pending().await,
        }
    };
    let mut node = Box::pin(node_watch(client.clone(), path.clone()));
    // A check every eighth of the timeout, given a sixteenth to answer; an unanswered one
    // makes the lock Uncertain and is tried again a sixteenth later, so that the first
    // check after a short cut ends is answered well before the deadline.
    let every = session.timeout / 8;
    let patience = session.timeout / 16;
    let probe_at = |c: zk::Client, p: String, at: Instant| async move {
        tokio::time::sleep_until(at).await;
        let sent = Instant::now();
        let answer = tokio::time::timeout(patience, async {
            c.sync(&p).await?;
            c.check_stat(&p).await
        })
        .await;
        (sent, answer)
    };
    let mut probe = Box::pin(probe_at(client.clone(), path.clone(), asked + every));
    // The grant's first deadline, set by `hold`.
    let mut until = *deadline.lock().unwrap_or_else(|p| p.into_inner());
    let outcome = loop {
        *deadline.lock().unwrap_or_else(|p| p.into_inner()) = until;
        tokio::select! {
            st = states.changed() => match st {
                zk::SessionState::Disconnected => {
                    disconnected = true;
                    tx.send_replace(SessionHealth::Suspended);
                }
                zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                    // Back in time: held again once a check finds the node still ours.
                    probe = Box::pin(probe_at(client.clone(), path.clone(), Instant::now()));
                }
                zk::SessionState::Expired => break ended("the ZooKeeper session expired".into()),
                zk::SessionState::Closed => break ended("the ZooKeeper client was closed".into()),
                zk::SessionState::AuthFailed => break ended("ZooKeeper authentication failed".into()),
            },
            ev = &mut node => match ev {
                Some(ev) if ev.event_type == zk::EventType::NodeDeleted => {
                    break SessionHealth::Ended(LossReason::NotHeld)
                }
                Some(ev) if ev.event_type == zk::EventType::Session => {
                    // Session-level news arrives on the state watcher too.
                    node = Box::pin(node_watch(client.clone(), path.clone()));
                    let _ = ev;
                }
                Some(_) => node = Box::pin(node_watch(client.clone(), path.clone())),
                None => break SessionHealth::Ended(LossReason::NotHeld),
            },
            (sent, answer) = &mut probe => {
                let mut next = sent + every;
                match answer {
                    Ok(Ok(Some(stat))) if stat.ephemeral_owner == session.id => {
                        until = confirmed_until(&session, sent);
                        if client.state() == zk::SessionState::SyncConnected {
                            disconnected = false;
                            tx.send_replace(SessionHealth::Alive { until });
                        }
                    }
                    Ok(Ok(_)) => break SessionHealth::Ended(LossReason::NotHeld),
                    // Unanswered: the deadline stays where the last answer put it.
                    _ => {
                        next = Instant::now().max(sent + patience);
                        if !disconnected {
                            disconnected = true;
                            tx.send_replace(SessionHealth::Suspended);
                        }
                    }
                }
                probe = Box::pin(probe_at(client.clone(), path.clone(), next));
            }
            () = tokio::time::sleep_until(until) => {
                // Unconfirmed for too long (disconnected, or answers lost): closed, so that
                // the session cannot come back holding a lock its owner gave up on.
                session.kill();
                break ended(format!(
                    "the session was not confirmed for half its timeout ({:?})",
                    session.timeout
                ));
            }
            () = session.killed() => {
                break ended("the session was given up (another lock on it was lost)".into());
            }
        }
    };
    tx.send_replace(outcome);
}

#[async_trait]
impl LockBackend for ZkBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(LeaseKind::Session)
            .fair(true)
            .notify_waits(true)
    }

    async fn try_acquire(&self, req: &AcquireRequest) -> Result<Grant, LockError> {
        lock_core::options::check_lease("lease", req.ttl)?;
        self.attempt(req, None).await
    }

    async fn acquire(
        &self,
        req: &AcquireRequest,
        deadline: Option<Instant>,
    ) -> Result<Grant, LockError> {
        lock_core::options::check_lease("lease", req.ttl)?;
        self.attempt(req, Some(deadline)).await
    }

    async fn renew(&self, lease: &LeaseRef, _ttl: Duration) -> Result<Instant, LockError> {
        if !self.held().contains_key(&lease.lease_id) {
            return Err(LockError::NotHeld {
                key: lease.key.to_string(),
            });
        }
        Err(LockError::no_lease_to_extend(NAME))
    }

    async fn release(&self, lease: &LeaseRef) -> Result<ReleaseOutcome, LockError> {
        let held = self.held().remove(&lease.lease_id);
        let (client, path, held_on) = match held {
            Some(h) => {
                h.monitor.abort();
                if h.expired() {
                    h.session.kill();
                }
                match h.session.client() {
                    Ok(c) => (c, Some(h.path), Some(h.session)),
                    // The session was given up: its nodes go when it closes or expires;
                    // delete this one now, through the current session, in case it still
                    // lives (the node's name is this lease's alone).
                    Err(_) => {
                        let client = self.session().await?.client()?;
                        let _ = self.timed("delete", client.delete(&h.path, None)).await;
                        return Ok(ReleaseOutcome::NotHeld);
                    }
                }
            }
            None => {
                // Not held here: clean up after an abandoned acquire by lease id.
                let client = self.session().await?.client()?;
                let parent = self.key_path(&lease.key);
                match self
                    .find_own_node(&client, &parent, &lease.lease_id)
                    .await?
                {
                    Some((p, _)) => (client, Some(p), None),
                    None => return Ok(ReleaseOutcome::NotHeld),
                }
            }
        };
        let Some(path) = path else {
            return Ok(ReleaseOutcome::NotHeld);
        };
        let op = self.inner.cfg.op_timeout;
        let first = delete_node(client, Node::Path(path), op, held_on);
        match first.await {
            Ok(Ok(Ok(()))) => Ok(ReleaseOutcome::Released),
            Ok(Ok(Err(zk::Error::NoNode))) => Ok(ReleaseOutcome::NotHeld),
            Ok(Ok(Err(e))) => Err(map_err(e)),
            Ok(Err(_)) => Err(LockError::OperationTimeout {
                backend: NAME,
                op: "delete",
                after: op,
            }),
            Err(_) => Err(LockError::backend(
                NAME,
                true,
                "the release's delete ended without an answer",
            )),
        }
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>, LockError> {
        let client = self.session().await?.client()?;
        let parent = self.key_path(key);
        // Through the leader first: a follower may not yet show what another client's
        // finished request changed (a waiter's node it removed, a release).
        match self.timed("sync", client.sync(&parent)).await? {
            Ok(()) | Err(zk::Error::NoNode) => {}
            Err(e) => return Err(map_err(e)),
        }
        for _ in 0..3 {
            let Some(queue) = self.queue(&client, &parent).await? else {
                return Ok(None);
            };
            let Some((_, first)) = queue.first() else {
                return Ok(None);
            };
            let path = format!("{parent}/{first}");
            let (data, stat) = match self.timed("get", client.get_data(&path)).await? {
                Ok(r) => r,
                // The holder released in between: look again.
                Err(zk::Error::NoNode) => continue,
                Err(e) => return Err(map_err(e)),
            };
            let text = String::from_utf8_lossy(&data);
            let (lease, meta) = text.split_once('\n').unwrap_or((&text, ""));
            let lease = match LeaseId::parse(lease) {
                Ok(l) => l,
                Err(_) => LeaseId::parse(lease_of(first).unwrap_or_default())?,
            };
            let token = u64::try_from(stat.czxid)
                .map_err(|_| LockError::Protocol(format!("negative czxid {}", stat.czxid)))?;
            return Ok(Some(
                LockInfo::new(lease, FencingToken::new(token), HolderMeta::decode(meta))
                    .waiters(Some(queue.len() - 1)),
            ));
        }
        Ok(None)
    }
}
