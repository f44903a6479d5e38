//! The MongoDB lock backend.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lock_core::keyed::{KeyTurns, KeyWakeups};
use lock_core::{
    AcquireRequest, Capabilities, FencedWrite, FencingToken, Grant, HolderMeta, LeaseId, LeaseKind,
    LeaseRef, LockBackend, LockError, LockInfo, LockKey, ReleaseOutcome, TokenGuarantee,
};
use mongodb::bson::{doc, Document};
use mongodb::options::{
    ClientOptions, CollectionOptions, ReadConcern, ReturnDocument, WriteConcern,
};
use mongodb::{Client, Collection};
use tokio::time::Instant;

use crate::config::{Durability, MongoConfig};
use crate::docs;
use std::future::IntoFuture;

use crate::error::{failure, meaning, to_lock_error, Failure, Meaning, NAME};

/// MongoDB's NamespaceExists error code.
const NAMESPACE_EXISTS: i32 = 48;

/// A lock backend on MongoDB lease documents.
///
/// Acquire is one `findOneAndUpdate` with upsert and an update pipeline: it takes the key's
/// document only if it is free or expired by the server's clock (`$$NOW`), and increments
/// the token kept in the same document, which is never deleted. Renew and release are
/// owner-checked. An operation whose outcome is unknown (timeout, network error, write
/// concern not satisfied) is resolved by re-reading the document by lease id. Waiters are
/// woken by a change stream on replica sets, and otherwise poll with jittered backoff.
#[derive(Clone, Debug)]
pub struct MongoBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: MongoConfig,
    coll: Collection<Document>,
    change_streams: bool,
    turns: KeyTurns,
    wakeups: Arc<KeyWakeups>,
    stream: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut s) = self.stream.try_lock() {
            if let Some(h) = s.take() {
                h.abort();
            }
        }
    }
}

enum Attempt {
    Granted(Grant),
    Held,
}

impl MongoBackend {
    /// Connects to `url` with default settings.
    pub async fn connect(url: &str) -> Result<Self, LockError> {
        Self::connect_with(MongoConfig::new(url)).await
    }

    /// Connects with explicit settings: checks them, reaches the deployment, creates the
    /// collection if it is missing, and detects change-stream support (replica sets).
    pub async fn connect_with(cfg: MongoConfig) -> Result<Self, LockError> {
        cfg.validate()?;
        let op = cfg.op_timeout;
        let mut opts = tokio::time::timeout(op, ClientOptions::parse(&cfg.url))
            .await
            .map_err(|_| LockError::InvalidConfig("resolving the MongoDB URL timed out".into()))?
            .map_err(|e| LockError::InvalidConfig(format!("bad MongoDB URL: {e}")))?;
        opts.server_selection_timeout = Some(op);
        opts.connect_timeout = Some(op);
        if opts.app_name.is_none() {
            opts.app_name = Some("lock-mongo".into());
        }
        let client = Client::with_options(opts)
            .map_err(|e| LockError::InvalidConfig(format!("MongoDB client options: {e}")))?;
        Self::open(client, cfg).await
    }

    /// Builds the backend on the application's own `mongodb::Client` (its deployment, TLS
    /// and credentials); `cfg` gives the other settings, its URL is not used. Checks them,
    /// reaches the deployment, creates the collection if it is missing.
    pub async fn from_client(client: Client, cfg: MongoConfig) -> Result<Self, LockError> {
        cfg.validate_settings()?;
        Self::open(client, cfg).await
    }

    async fn open(client: Client, cfg: MongoConfig) -> Result<Self, LockError> {
        let op = cfg.op_timeout;
        let db = client.database(&cfg.database);
        let (wc, rc) = match cfg.durability {
            Durability::Majority => (
                WriteConcern::builder()
                    .w(mongodb::options::Acknowledgment::Majority)
                    .journal(true)
                    .build(),
                ReadConcern::majority(),
            ),
            Durability::Primary => (WriteConcern::nodes(1), ReadConcern::local()),
        };
        let hello = bounded(op, "hello", db.run_command(doc! { "hello": 1 })).await?;
        let change_streams = hello.get_str("setName").is_ok();
        let created = tokio::time::timeout(
            op,
            db.create_collection(&cfg.collection)
                .write_concern(wc.clone())
                .into_future(),
        )
        .await
        .map_err(|_| LockError::OperationTimeout {
            backend: NAME,
            op: "create collection",
            after: op,
        })?;
        match created {
            Ok(()) => {}
            // NamespaceExists: created before, or by a concurrent first use.
            Err(e) if failure(&e) == Failure::Server(NAMESPACE_EXISTS) => {}
            Err(e) => return Err(to_lock_error(e)),
        }
        let coll = db.collection_with_options::<Document>(
            &cfg.collection,
            CollectionOptions::builder()
                .write_concern(wc)
                .read_concern(rc)
                .build(),
        );
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                coll,
                change_streams,
                turns: KeyTurns::default(),
                wakeups: Arc::new(KeyWakeups::default()),
                stream: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// Whether waiters are woken by a change stream (replica sets) rather than polling.
    pub fn uses_change_streams(&self) -> bool {
        self.inner.change_streams
    }

    /// The lease collection (for operators and tests).
    pub fn collection(&self) -> &Collection<Document> {
        &self.inner.coll
    }

    /// Updates the one document of `coll` that matches `filter` (match by `_id`), applying
    /// `update` (an update document with operators), only if the token stored in `field` is
    /// not higher than `token`; the document then carries `token` in `field`. One document
    /// per call: MongoDB writes several documents one by one, so a fence over many could
    /// write some and refuse others. A document without the field (or with a non-integer
    /// in it) is an error: create fenced documents with `field: 0`. One collection must be
    /// written under the tokens of one lock key only.
    pub async fn fenced_update(
        &self,
        coll: &Collection<Document>,
        filter: Document,
        update: Document,
        field: &str,
        token: FencingToken,
    ) -> Result<FencedWrite, LockError> {
        if field.is_empty() || field.starts_with('$') || field.contains('.') {
            return Err(LockError::InvalidOptions(format!(
                "token field {field:?} must be a plain top-level field name"
            )));
        }
        let op = self.inner.cfg.op_timeout;
        let (f, u) = docs::fenced(filter.clone(), update, field, token)
            .map_err(LockError::InvalidOptions)?;
        let r = bounded(op, "fenced update", coll.update_one(f, u)).await?;
        if r.matched_count > 0 {
            return Ok(FencedWrite::Applied(r.matched_count));
        }
        // Not written: no document matched, or its token is ahead, or it has none.
        let Some(d) = bounded(op, "fenced read", coll.find_one(filter)).await? else {
            return Ok(FencedWrite::NoMatch);
        };
        match docs::as_i64(d.get(field)).map(u64::try_from) {
            Some(Ok(h)) if h > token.get() => Ok(FencedWrite::Refused {
                highest: FencingToken::new(h),
            }),
            None | Some(Err(_)) => Err(LockError::InvalidConfig(format!(
                "the document has no usable {field:?} (an integer token): a fenced document \
                 must carry one (0 when created); nothing was written"
            ))),
            // The document changed between the update and the read: report no write.
            Some(Ok(_)) => Ok(FencedWrite::NoMatch),
        }
    }

    fn op(&self) -> Duration {
        self.inner.cfg.op_timeout
    }

    /// Reads the key's document with its remaining lease by the server's clock.
    async fn read(&self, key: &LockKey) -> Result<Option<docs::Lease>, LockError> {
        let mut cursor = bounded(
            self.op(),
            "read",
            self.inner.coll.aggregate(docs::read_pipeline(key)),
        )
        .await?;
        match tokio::time::timeout(self.op(), cursor.next()).await {
            Ok(Some(Ok(d))) => docs::parse_lease(&d)
                .map(Some)
                .ok_or_else(|| LockError::Protocol(format!("malformed lease document {d}"))),
            Ok(Some(Err(e))) => Err(to_lock_error(e)),
            Ok(None) => Ok(None),
            Err(_) => Err(LockError::OperationTimeout {
                backend: NAME,
                op: "read",
                after: self.op(),
            }),
        }
    }

    async fn attempt(&self, req: &AcquireRequest) -> Result<Attempt, LockError> {
        let sent = Instant::now();
        let res = tokio::time::timeout(
            self.op(),
            self.inner
                .coll
                .find_one_and_update(
                    docs::acquire_filter(&req.key),
                    docs::acquire_update(&req.lease_id, &req.meta, req.ttl),
                )
                .upsert(true)
                .return_document(ReturnDocument::After),
        )
        .await;
        let unknown = match res {
            Ok(Ok(Some(d))) => {
                let lease = docs::parse_lease(&d)
                    .ok_or_else(|| LockError::Protocol(format!("malformed lease document {d}")))?;
                return Ok(if lease.owner.as_deref() == Some(req.lease_id.as_str()) {
                    Attempt::Granted(Grant::ttl(FencingToken::new(lease.token), sent + req.ttl))
                } else {
                    Attempt::Held
                });
            }
            Ok(Ok(None)) => return Ok(Attempt::Held),
            Ok(Err(e)) => match meaning(&failure(&e)) {
                Meaning::Contended => return Ok(Attempt::Held),
                Meaning::Unknown => to_lock_error(e),
                _ => return Err(to_lock_error(e)),
            },
            Err(_) => LockError::OperationTimeout {
                backend: NAME,
                op: "acquire",
                after: self.op(),
            },
        };
        // The outcome is unknown: re-read by lease id.
        match self.read(&req.key).await {
            Ok(Some(l))
                if l.owner.as_deref() == Some(req.lease_id.as_str())
                    && l.remaining_ms.is_some_and(|r| r > 0) =>
            {
                // Applied: the lease started no earlier than `sent`.
                Ok(Attempt::Granted(Grant::ttl(
                    FencingToken::new(l.token),
                    sent + req.ttl,
                )))
            }
            // Not (yet) applied as far as a majority read can tell: report the unknown
            // outcome; the client then releases by lease id in case it lands later.
            _ => Err(unknown),
        }
    }

    /// Starts the shared change stream (replica sets only) if it is not running.
    async fn ensure_stream(&self) {
        if !self.inner.change_streams {
            return;
        }
        let mut s = self.inner.stream.lock().await;
        if s.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let coll = self.inner.coll.clone();
        let wakeups = Arc::downgrade(&self.inner.wakeups);
        *s = Some(tokio::spawn(async move {
            loop {
                if let Ok(mut stream) = coll.watch().pipeline(docs::change_pipeline()).await {
                    while let Some(Ok(ev)) = stream.next().await {
                        let Some(w) = wakeups.upgrade() else { return };
                        if let Some(Ok(key)) = ev.document_key.as_ref().map(|k| k.get_str("_id")) {
                            w.wake(key);
                        }
                    }
                }
                if wakeups.strong_count() == 0 {
                    return;
                }
                // The stream broke: waiters poll meanwhile; try again shortly.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
    }
}

async fn bounded<T>(
    t: Duration,
    op: &'static str,
    f: impl std::future::IntoFuture<Output = mongodb::error::Result<T>>,
) -> Result<T, LockError> {
    match tokio::time::timeout(t, f.into_future()).await {
        Ok(r) => r.map_err(to_lock_error),
        Err(_) => Err(LockError::OperationTimeout {
            backend: NAME,
            op,
            after: t,
        }),
    }
}

#[async_trait]
impl LockBackend for MongoBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        let tokens = match self.inner.cfg.durability {
            Durability::Majority => TokenGuarantee::Durable,
            // A failover can lose acknowledged increments: a later grant may repeat a
            // token.
            Durability::Primary => TokenGuarantee::None,
        };
        Capabilities::new(LeaseKind::Ttl)
            .notify_waits(self.inner.change_streams)
            .tokens(tokens)
    }

    async fn try_acquire(&self, req: &AcquireRequest) -> Result<Grant, LockError> {
        lock_core::options::check_lease("lease", req.ttl)?;
        match self.attempt(req).await? {
            Attempt::Granted(g) => Ok(g),
            Attempt::Held => Err(LockError::contended(&req.key)),
        }
    }

    async fn acquire(
        &self,
        req: &AcquireRequest,
        deadline: Option<Instant>,
    ) -> Result<Grant, LockError> {
        lock_core::options::check_lease("lease", req.ttl)?;
        let started = Instant::now();
        let _turn = self.inner.turns.turn(&req.key, started, deadline).await?;
        self.ensure_stream().await;
        let wake = self.inner.wakeups.get(req.key.as_str());
        let mut attempt_no = 0u32;
        loop {
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Attempt::Granted(g) = self.attempt(req).await? {
                return Ok(g);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(LockError::timeout(&req.key, now - started));
            }
            let mut pause = if self.inner.change_streams {
                self.inner.cfg.poll_max
            } else {
                req.backoff.delay(attempt_no).min(self.inner.cfg.poll_max)
            };
            attempt_no = attempt_no.saturating_add(1);
            if let Some(d) = deadline {
                pause = pause.min(d - now);
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    async fn renew(&self, lease: &LeaseRef, ttl: Duration) -> Result<Instant, LockError> {
        lock_core::options::check_lease("lease", ttl)?;
        let sent = Instant::now();
        let res = tokio::time::timeout(
            self.op(),
            self.inner.coll.update_one(
                docs::renew_filter(&lease.key, &lease.lease_id),
                docs::renew_update(ttl),
            ),
        )
        .await;
        let unknown = match res {
            Ok(Ok(r)) if r.matched_count == 1 => return Ok(sent + ttl),
            Ok(Ok(_)) => {
                return Err(LockError::NotHeld {
                    key: lease.key.to_string(),
                })
            }
            Ok(Err(e)) if meaning(&failure(&e)) == Meaning::Unknown => to_lock_error(e),
            Ok(Err(e)) => return Err(to_lock_error(e)),
            Err(_) => LockError::OperationTimeout {
                backend: NAME,
                op: "renew",
                after: self.op(),
            },
        };
        // Unknown outcome: the document says whether we still hold it and until when.
        let read_sent = Instant::now();
        match self.read(&lease.key).await {
            Ok(Some(l)) if l.owner.as_deref() == Some(lease.lease_id.as_str()) => {
                match l.remaining_ms.and_then(|r| u64::try_from(r).ok()) {
                    Some(r) if r > 0 => Ok(read_sent + Duration::from_millis(r)),
                    _ => Err(LockError::NotHeld {
                        key: lease.key.to_string(),
                    }),
                }
            }
            Ok(_) => Err(LockError::NotHeld {
                key: lease.key.to_string(),
            }),
            Err(_) => Err(unknown),
        }
    }

    async fn release(&self, lease: &LeaseRef) -> Result<ReleaseOutcome, LockError> {
        let res = tokio::time::timeout(
            self.op(),
            self.inner
                .coll
                .find_one_and_update(
                    docs::owner_filter(&lease.key, &lease.lease_id),
                    docs::release_update(),
                )
                .return_document(ReturnDocument::Before)
                .projection(doc! { "live": { "$gt": ["$expiresAt", "$$NOW"] } }),
        )
        .await;
        let unknown = match res {
            Ok(Ok(Some(d))) => {
                return Ok(if d.get_bool("live").unwrap_or(false) {
                    ReleaseOutcome::Released
                } else {
                    ReleaseOutcome::NotHeld
                })
            }
            Ok(Ok(None)) => return Ok(ReleaseOutcome::NotHeld),
            Ok(Err(e)) if meaning(&failure(&e)) == Meaning::Unknown => to_lock_error(e),
            Ok(Err(e)) => return Err(to_lock_error(e)),
            Err(_) => LockError::OperationTimeout {
                backend: NAME,
                op: "release",
                after: self.op(),
            },
        };
        // Unknown outcome: if the document no longer names us, the release took effect
        // (or the lease had already gone); if it still does, it did not.
        match self.read(&lease.key).await {
            Ok(Some(l)) if l.owner.as_deref() == Some(lease.lease_id.as_str()) => Err(unknown),
            Ok(_) => Ok(ReleaseOutcome::Released),
            Err(_) => Err(unknown),
        }
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>, LockError> {
        let Some(l) = self.read(key).await? else {
            return Ok(None);
        };
        let (Some(owner), Some(left)) = (l.owner, l.remaining_ms) else {
            return Ok(None);
        };
        if left <= 0 {
            return Ok(None);
        }
        Ok(Some(
            LockInfo::new(
                LeaseId::parse(&owner)?,
                FencingToken::new(l.token),
                HolderMeta::decode(l.meta.as_deref().unwrap_or("")),
            )
            .remaining(Some(Duration::from_millis(
                u64::try_from(left).unwrap_or(0),
            ))),
        ))
    }
}
