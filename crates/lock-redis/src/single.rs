//! The single-node backend.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lock_core::{
    AcquireRequest, Capabilities, FencedWrite, FencingToken, Grant, HolderMeta, LeaseId, LeaseKind,
    LeaseRef, LockBackend, LockError, LockInfo, LockKey, ReleaseOutcome, TokenGuarantee,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, Value};
use tokio::time::Instant;

use crate::batch::{Answer, Attempt, Batcher, Kind, Op, Outcome, Params};
use crate::config::{redact, RedisConfig};
use crate::error::{map_err, NAME};
use crate::scripts::{lock_key, marker_key, Scripts, FENCE_KEEP};

/// How often a waiter re-checks (and refreshes its queue entry) without a wake-up.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A waiter not seen for this long is presumed dead and leaves the queue.
const WAITER_TTL: Duration = Duration::from_secs(3);
/// Idle blocking connections kept for reuse; more concurrent waiters open their own.
const MAX_IDLE_BLOCKERS: usize = 16;
/// How many times a fenced update reads again after the value changed under it.
const MAX_UPDATE_TRIES: usize = 32;

/// A lock backend on one Redis server (6.2 or newer, standalone, `noeviction`).
///
/// Acquire, renew and release are one round trip each (one script). Waiters queue on the
/// server and block on a personal list; a release wakes exactly the first live waiter, so
/// there is no herd and no polling (a waiter still re-checks every second, which also keeps
/// its queue entry alive; a dead waiter's entry expires within three seconds).
#[derive(Clone, Debug)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: Client,
    conn: ConnectionManager,
    cfg: RedisConfig,
    /// The server's `run_id` when this backend connected.
    run_id: String,
    scripts: Scripts,
    /// Acquires and releases, batched under load.
    batch: Arc<Batcher>,
    /// Connections for blocking waits (BLPOP blocks the connection it runs on).
    blockers: Mutex<Vec<MultiplexedConnection>>,
}

/// A fenced resource's value and the token that wrote it (see
/// [`RedisBackend::fenced_set`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FencedValue {
    /// The value.
    pub value: String,
    /// The highest token that wrote it.
    pub token: FencingToken,
}

impl RedisBackend {
    /// Connects to the server at `url` (`redis://host:port/db`) with default settings.
    pub async fn connect(url: &str) -> Result<Self, LockError> {
        Self::connect_with(RedisConfig::new(url)).await
    }

    /// Connects with explicit settings, and checks the server: Redis 6.2 or newer, not in
    /// cluster mode, and a `maxmemory-policy` of `noeviction` (unless
    /// [`RedisConfig::allow_eviction`]).
    pub async fn connect_with(cfg: RedisConfig) -> Result<Self, LockError> {
        Self::open(cfg, Arc::default()).await
    }

    /// Builds the backend on the application's own `redis::Client` (its address, TLS
    /// settings and credentials); `cfg` gives the other settings, its URL is not used. The
    /// backend opens its own connections from the client: one shared, multiplexed
    /// connection, and one per blocked waiter.
    pub async fn from_client(client: Client, cfg: RedisConfig) -> Result<Self, LockError> {
        cfg.validate_settings()?;
        Self::open_client(client, cfg, Arc::default()).await
    }

    /// Connects as one node of a Redlock: a node whose lock data began less than `sit_out`
    /// (ms, shared by the Redlock's nodes) ago grants nothing (see the `scripts` module).
    pub(crate) async fn open(cfg: RedisConfig, sit_out: Arc<AtomicU64>) -> Result<Self, LockError> {
        cfg.validate()?;
        let client = client_for(&cfg)?;
        Self::open_client(client, cfg, sit_out).await
    }

    async fn open_client(
        client: Client,
        cfg: RedisConfig,
        sit_out: Arc<AtomicU64>,
    ) -> Result<Self, LockError> {
        let mcfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.op_timeout))
            .set_response_timeout(Some(cfg.op_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = tokio::time::timeout(
            cfg.op_timeout * 2,
            ConnectionManager::new_with_config(client.clone(), mcfg),
        )
        .await
        .map_err(|_| LockError::OperationTimeout {
            backend: NAME,
            op: "connect",
            after: cfg.op_timeout * 2,
        })?
        .map_err(connect_err)?;
        let run_id = tokio::time::timeout(cfg.op_timeout * 2, check_server(&conn, &cfg))
            .await
            .map_err(|_| LockError::OperationTimeout {
                backend: NAME,
                op: "connect",
                after: cfg.op_timeout * 2,
            })??;
        let scripts = Scripts::new();
        let batch = Arc::new(Batcher::new(
            conn.clone(),
            scripts.ops.clone(),
            Params {
                fair: cfg.fair,
                waiter_ttl: WAITER_TTL,
                sit_out,
                marker: marker_key(&cfg.namespace),
            },
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                conn,
                cfg,
                run_id,
                scripts,
                batch,
                blockers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The settings in use.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.cfg
    }

    /// The server's `run_id` when this backend connected.
    pub(crate) fn run_id(&self) -> &str {
        &self.inner.run_id
    }

    /// A clone of the shared (multiplexed, reconnecting) connection, for your own commands.
    pub fn connection(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    fn lock_key(&self, key: &LockKey) -> String {
        lock_key(&self.inner.cfg.namespace, key.as_str())
    }

    /// The error for `key`'s lock key holding another writer's value (one without an
    /// expiry); the value stays out of the message.
    fn foreign(&self, key: &LockKey) -> LockError {
        LockError::InvalidConfig(format!(
            "the lock key {:?} holds a value this library did not write (it has no expiry): \
             keep other writers out of the namespace, or choose another \
             (RedisConfig::namespace); nothing was written",
            self.lock_key(key)
        ))
    }

    pub(crate) async fn attempt(
        &self,
        req: &AcquireRequest,
        wait: bool,
    ) -> Result<Attempt, LockError> {
        let reply = self
            .inner
            .batch
            .submit(Op {
                kind: if wait { Kind::Wait } else { Kind::Try },
                key: self.lock_key(&req.key),
                lease: req.lease_id.as_str().to_owned(),
                ttl_ms: req.ttl.as_millis() as u64,
                meta: req.meta.encode(),
            })
            .await?;
        match reply {
            Answer::Attempt(a) => Ok(a),
            other => Err(LockError::Protocol(format!(
                "acquire script answered {other:?}"
            ))),
        }
    }

    /// Releases `lease`; with `only`, only its grant of that token (a Redlock round giving
    /// back what it was granted, which must spare a later round's grant).
    pub(crate) async fn give_back(
        &self,
        lease: &LeaseRef,
        only: Option<u64>,
    ) -> Result<ReleaseOutcome, LockError> {
        let reply = self
            .inner
            .batch
            .submit(Op {
                kind: Kind::Release,
                key: self.lock_key(&lease.key),
                lease: lease.lease_id.as_str().to_owned(),
                ttl_ms: 0,
                meta: only.map(|t| t.to_string()).unwrap_or_default(),
            })
            .await?;
        match reply {
            Answer::Released(true) => Ok(ReleaseOutcome::Released),
            Answer::Released(false) => Ok(ReleaseOutcome::NotHeld),
            other => Err(LockError::Protocol(format!(
                "release script answered {other:?}"
            ))),
        }
    }

    /// Waits until `replica_acks` replicas have everything written so far on this
    /// connection; `Ok(true)` if they have (or none are asked for).
    async fn replicated(&self) -> Result<Result<(), String>, LockError> {
        let Some((replicas, wait)) = self.inner.cfg.replica_acks else {
            return Ok(Ok(()));
        };
        let mut conn = self.inner.conn.clone();
        let acked: i64 = redis::cmd("WAIT")
            .arg(replicas)
            .arg(wait.as_millis() as u64)
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        Ok(if acked >= replicas as i64 {
            Ok(())
        } else {
            Err(format!(
                "only {acked} of {replicas} replicas acknowledged within {wait:?}"
            ))
        })
    }

    /// Applies the optional replica acknowledgement; gives the grant back if it fails.
    async fn acknowledge(&self, req: &AcquireRequest) -> Result<(), LockError> {
        let why = match self.replicated().await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(why)) => why,
            Err(e) => format!("WAIT failed: {e}"),
        };
        let _ = self.release(&req.lease()).await;
        Err(LockError::backend(NAME, true, format!("the grant: {why}")))
    }

    fn grant(&self, a: &Attempt, sent: Instant, ttl: Duration) -> Grant {
        let left = if a.pttl > 0 {
            Duration::from_millis(a.pttl as u64).min(ttl)
        } else {
            ttl
        };
        Grant::ttl(FencingToken::new(a.token), sent + left)
    }

    /// Waits for `req`'s turn after an attempt that found the key held (`pttl`: the
    /// holder's remaining lease in ms, or 0 or less when there is none): blocks on this
    /// waiter's wake-up list, bounded by the heartbeat, the holder's lease and `deadline`,
    /// then tries again.
    async fn wait_for_grant(
        &self,
        req: &AcquireRequest,
        deadline: Option<Instant>,
        started: Instant,
        mut pttl: i64,
    ) -> Result<Grant, LockError> {
        let wake_list = format!("{}:wake:{}", self.lock_key(&req.key), req.lease_id);
        let mut blocker: Option<MultiplexedConnection> = None;
        loop {
            let now = Instant::now();
            let mut wait = HEARTBEAT;
            if pttl > 0 {
                wait = wait.min(Duration::from_millis(pttl as u64 + 1));
            }
            if let Some(d) = deadline {
                if now >= d {
                    self.release(&req.lease()).await?;
                    return Err(LockError::timeout(&req.key, now - started));
                }
                wait = wait.min(d - now);
            }
            let conn = match blocker.as_mut() {
                Some(c) => c,
                None => blocker.insert(self.blocker().await?),
            };
            let secs = wait.as_secs_f64().max(0.001);
            let _: Option<Value> = redis::cmd("BLPOP")
                .arg(&wake_list)
                .arg(format!("{secs:.3}"))
                .query_async(conn)
                .await
                .map_err(map_err)?;
            let sent = Instant::now();
            let a = self.attempt(req, true).await?;
            if a.outcome == Outcome::Granted {
                if let Some(b) = blocker.take() {
                    let mut idle = self
                        .inner
                        .blockers
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    if idle.len() < MAX_IDLE_BLOCKERS {
                        idle.push(b);
                    }
                }
                self.acknowledge(req).await?;
                return Ok(self.grant(&a, sent, req.ttl));
            }
            if a.outcome == Outcome::Foreign {
                // Out of the queue first: the key may be usable again later.
                self.release(&req.lease()).await?;
                return Err(self.foreign(&req.key));
            }
            pttl = a.pttl;
        }
    }

    async fn blocker(&self) -> Result<MultiplexedConnection, LockError> {
        let pooled = self
            .inner
            .blockers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        if let Some(c) = pooled {
            return Ok(c);
        }
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.inner.cfg.op_timeout))
            .set_response_timeout(Some(HEARTBEAT + self.inner.cfg.op_timeout));
        self.inner
            .client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .map_err(map_err)
    }

    /// Refuses a fenced resource named "" or inside the lock's own key space (a lock key,
    /// its helper keys, a node marker): a hash written there would break the lock.
    fn check_resource(&self, resource: &str) -> Result<(), LockError> {
        let ns = &self.inner.cfg.namespace;
        let reason = if resource.is_empty() {
            "a fenced resource needs a name".to_owned()
        } else if resource.starts_with(&format!("{ns}{{")) || resource == marker_key(ns) {
            format!("names under {ns:?} followed by {{ are the lock's own keys")
        } else {
            return Ok(());
        };
        Err(LockError::InvalidKey {
            key: resource.chars().take(64).collect(),
            reason,
        })
    }

    /// The value of the fenced resource `resource` and the token that wrote it.
    pub async fn fenced_get(&self, resource: &str) -> Result<Option<FencedValue>, LockError> {
        self.check_resource(resource)?;
        let mut conn = self.inner.conn.clone();
        let (value, token): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(resource)
            .arg("value")
            .arg("token")
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        match (value, token) {
            (Some(value), Some(token)) => Ok(Some(FencedValue {
                value,
                token: parse_token(&token)?,
            })),
            (None, None) => Ok(None),
            // The stored value stays out of the message: it is the application's data.
            (value, _) => Err(LockError::Protocol(format!(
                "fenced resource {resource:?} holds {} without {}",
                if value.is_some() {
                    "a value"
                } else {
                    "a token"
                },
                if value.is_some() {
                    "its token"
                } else {
                    "a value"
                },
            ))),
        }
    }

    /// Writes `value` to the fenced resource `resource` (a hash of the value and the token
    /// that wrote it, so the two cannot outlive each other) if `token` is not lower than
    /// the token stored there; equal tokens are accepted, so one holder may write many
    /// times. One round trip (plus `WAIT` with [`RedisConfig::replica_acks`], whose failure
    /// is an error: the write may not survive a failover).
    ///
    /// For a value computed from the current one use [`RedisBackend::fenced_update`]: a
    /// read followed by `fenced_set` lets an older holder's write slip in between and be
    /// overwritten.
    ///
    /// One resource must be written under the tokens of one lock key only: tokens of
    /// different keys are not ordered with each other.
    pub async fn fenced_set(
        &self,
        resource: &str,
        token: FencingToken,
        value: &str,
    ) -> Result<FencedWrite, LockError> {
        self.check_resource(resource)?;
        match self.fenced_write(resource, token, value, None).await? {
            Written::Applied => self.written().await,
            Written::Refused(highest) => Ok(FencedWrite::Refused { highest }),
            Written::Changed => Err(LockError::Protocol(
                "a fenced set reported a changed value".into(),
            )),
        }
    }

    /// A fenced read-modify-write of `resource`: `f` gets the current value (`None` if
    /// there is none) and returns the new one, which is written only if the stored token is
    /// not higher than `token` and the value is still the one `f` saw (if another write came
    /// between, `f` runs again on the new value). Refused, nothing is written and `f` is not
    /// run again. See [`RedisBackend::fenced_set`] for the fence itself.
    ///
    /// ```no_run
    /// # async fn f(redis: lock_redis::RedisBackend, guard: lock_redis::LockGuard) -> Result<(), lock_redis::LockError> {
    /// use lock_redis::FencedWrite;
    /// let sold = redis
    ///     .fenced_update("inventory:item-1", guard.token(), |stock| {
    ///         let left: u64 = stock.and_then(|s| s.parse().ok()).unwrap_or(100);
    ///         left.saturating_sub(1).to_string()
    ///     })
    ///     .await?;
    /// assert!(matches!(sold, FencedWrite::Applied(1)), "a later holder already wrote");
    /// # Ok(()) }
    /// ```
    pub async fn fenced_update<F>(
        &self,
        resource: &str,
        token: FencingToken,
        mut f: F,
    ) -> Result<FencedWrite, LockError>
    where
        F: FnMut(Option<&str>) -> String,
    {
        self.check_resource(resource)?;
        for _ in 0..MAX_UPDATE_TRIES {
            let cur = self.fenced_get(resource).await?;
            if let Some(c) = cur.as_ref().filter(|c| c.token > token) {
                return Ok(FencedWrite::Refused { highest: c.token });
            }
            let seen = cur.map(|c| c.value);
            let new = f(seen.as_deref());
            match self
                .fenced_write(resource, token, &new, Some(seen.as_deref()))
                .await?
            {
                Written::Applied => return self.written().await,
                Written::Refused(highest) => return Ok(FencedWrite::Refused { highest }),
                Written::Changed => {}
            }
        }
        Err(LockError::backend(
            NAME,
            true,
            format!(
                "fenced update of {resource:?}: the value changed under it {MAX_UPDATE_TRIES} \
                 times (another writer with the same or a lower token)"
            ),
        ))
    }

    /// The result of an applied fenced write, after the optional replica acknowledgement.
    async fn written(&self) -> Result<FencedWrite, LockError> {
        match self.replicated().await? {
            Ok(()) => Ok(FencedWrite::Applied(1)),
            Err(why) => Err(LockError::backend(
                NAME,
                true,
                format!("the fenced write was applied on the primary, but {why}"),
            )),
        }
    }

    async fn fenced_write(
        &self,
        resource: &str,
        token: FencingToken,
        value: &str,
        expected: Option<Option<&str>>,
    ) -> Result<Written, LockError> {
        let mut conn = self.inner.conn.clone();
        let mut inv = self.inner.scripts.fenced_write.prepare_invoke();
        inv.key(resource).arg(token.get().to_string()).arg(value);
        match expected {
            None => inv.arg("0"),
            Some(None) => inv.arg("1").arg("0"),
            Some(Some(v)) => inv.arg("1").arg("1").arg(v),
        };
        let (code, stored): (i64, String) = inv.invoke_async(&mut conn).await.map_err(map_err)?;
        match code {
            1 => Ok(Written::Applied),
            0 => Ok(Written::Refused(parse_token(&stored)?)),
            2 => Ok(Written::Changed),
            n => Err(LockError::Protocol(format!("fenced write answered {n}"))),
        }
    }

    pub(crate) async fn raise_floor(&self, key: &LockKey, token: u64) -> Result<(), LockError> {
        let mut conn = self.inner.conn.clone();
        let _: i64 = self
            .inner
            .scripts
            .raise_floor
            .key(format!("{}:fence", self.lock_key(key)))
            .arg(token.to_string())
            .arg(FENCE_KEEP.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(map_err)?;
        Ok(())
    }
}

/// What a fenced write script did.
enum Written {
    Applied,
    Refused(FencingToken),
    /// The value was not the one read (compare-and-set only).
    Changed,
}

fn parse_token(t: &str) -> Result<FencingToken, LockError> {
    t.parse::<u64>()
        .map(FencingToken::new)
        .map_err(|_| LockError::Protocol(format!("token {t:?} is not a 64-bit number")))
}

/// The value of `field` in an `INFO` reply.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

/// The client for `cfg`'s URL, with its TLS settings.
fn client_for(cfg: &RedisConfig) -> Result<Client, LockError> {
    let bad = |e: redis::RedisError| {
        LockError::InvalidConfig(format!("bad Redis URL {}: {e}", redact(&cfg.url)))
    };
    #[cfg(feature = "tls")]
    if cfg.url.starts_with("rediss://") {
        // rustls needs a process-wide provider when more than one is compiled in.
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let certs = redis::TlsCertificates {
            client_tls: cfg
                .tls_client_pem
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: cfg.tls_ca_pem.clone(),
        };
        return Client::build_with_tls(cfg.url.as_str(), certs).map_err(bad);
    }
    Client::open(cfg.url.as_str()).map_err(bad)
}

/// A failed first connection: a certificate refused on either side will be refused on a
/// retry too, so it is a configuration error, named as such.
fn connect_err(e: redis::RedisError) -> LockError {
    let text = e.to_string();
    let hint = if text.contains("invalid peer certificate") {
        "the server's certificate was not accepted (wrong CA, or a host name it does not name?)"
    } else if text.contains("CertificateRequired") {
        "the server asks for a client certificate (RedisConfig::tls_client_pem)"
    } else if text.contains("fatal alert") {
        "the server refused the handshake (is the client certificate one it trusts?)"
    } else {
        return map_err(e);
    };
    LockError::InvalidConfig(format!("TLS: {hint}: {text}"))
}

/// Refuses servers on which the lock is not safe: older than 6.2 (the scripts need
/// `SET .. GET` and `PXAT`), in cluster mode, or allowed to evict keys. Returns the
/// server's `run_id`.
async fn check_server(conn: &ConnectionManager, cfg: &RedisConfig) -> Result<String, LockError> {
    let section = |name: &'static str| {
        let mut c = conn.clone();
        async move {
            redis::cmd("INFO")
                .arg(name)
                .query_async::<String>(&mut c)
                .await
                .map_err(map_err)
        }
    };
    let server = section("server").await?;
    let version: Vec<u32> = info_field(&server, "redis_version")
        .unwrap_or("0")
        .split('.')
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    if version.as_slice() < [6, 2].as_slice() {
        return Err(LockError::InvalidConfig(format!(
            "the server runs Redis {}; lock-redis needs 6.2 or newer",
            info_field(&server, "redis_version").unwrap_or("of an unknown version")
        )));
    }
    if info_field(&section("cluster").await?, "cluster_enabled") == Some("1") {
        return Err(LockError::InvalidConfig(
            "the server runs in cluster mode, which lock-redis does not support (its scripts \
             reach keys they do not declare); use a standalone server or Redlock over \
             independent servers"
                .into(),
        ));
    }
    let memory = section("memory").await?;
    let policy = info_field(&memory, "maxmemory_policy").unwrap_or("unknown");
    if policy != "noeviction" && !cfg.allow_eviction {
        return Err(LockError::InvalidConfig(format!(
            "the server's maxmemory-policy is {policy}: it may evict a held lock (a second \
             holder) or a fenced resource (its fence forgotten). Set maxmemory-policy to \
             noeviction, or accept the risk with RedisConfig::allow_eviction(true)"
        )));
    }
    Ok(info_field(&server, "run_id").unwrap_or_default().to_owned())
}

#[async_trait]
impl LockBackend for RedisBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(LeaseKind::Ttl)
            .fair(self.inner.cfg.fair)
            .notify_waits(true)
            .tokens(TokenGuarantee::Monotonic)
            .max_key_len(lock_core::MAX_KEY_LEN)
    }

    async fn try_acquire(&self, req: &AcquireRequest) -> Result<Grant, LockError> {
        lock_core::options::check_lease("lease", req.ttl)?;
        let sent = Instant::now();
        let a = self.attempt(req, false).await?;
        match a.outcome {
            Outcome::Granted => {}
            Outcome::Foreign => return Err(self.foreign(&req.key)),
            _ => return Err(LockError::contended(&req.key)),
        }
        self.acknowledge(req).await?;
        Ok(self.grant(&a, sent, req.ttl))
    }

    async fn acquire(
        &self,
        req: &AcquireRequest,
        deadline: Option<Instant>,
    ) -> Result<Grant, LockError> {
        lock_core::options::check_lease("lease", req.ttl)?;
        let started = Instant::now();
        let a = self.attempt(req, true).await?;
        match a.outcome {
            Outcome::Granted => {
                self.acknowledge(req).await?;
                return Ok(self.grant(&a, started, req.ttl));
            }
            Outcome::Foreign => return Err(self.foreign(&req.key)),
            _ => {}
        }
        // The waiting loop is a future of its own, allocated only when the key is held:
        // the uncontended acquire's future stays small.
        Box::pin(self.wait_for_grant(req, deadline, started, a.pttl)).await
    }

    async fn renew(&self, lease: &LeaseRef, ttl: Duration) -> Result<Instant, LockError> {
        lock_core::options::check_lease("lease", ttl)?;
        let sent = Instant::now();
        let mut conn = self.inner.conn.clone();
        let ok: i64 = self
            .inner
            .scripts
            .renew
            .key(self.lock_key(&lease.key))
            .arg(lease.lease_id.as_str())
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(map_err)?;
        if ok == 1 {
            Ok(sent + ttl)
        } else {
            Err(LockError::NotHeld {
                key: lease.key.to_string(),
            })
        }
    }

    async fn release(&self, lease: &LeaseRef) -> Result<ReleaseOutcome, LockError> {
        self.give_back(lease, None).await
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>, LockError> {
        let mut conn = self.inner.conn.clone();
        let reply: Vec<Value> = self
            .inner
            .scripts
            .inspect
            .key(self.lock_key(key))
            .invoke_async(&mut conn)
            .await
            .map_err(map_err)?;
        if reply.is_empty() {
            return Ok(None);
        }
        let lock_key = self.lock_key(key);
        // The value stays out of the message: it may be another writer's data.
        let bad = || LockError::Protocol(format!("inspect of {lock_key:?} read an unknown value"));
        let [Value::BulkString(v), Value::Int(pttl), Value::Int(live)] = &reply[..] else {
            return Err(bad());
        };
        if *pttl == -1 {
            return Err(self.foreign(key));
        }
        // `lease:token:meta`; the meta may itself hold colons.
        let v = std::str::from_utf8(v).map_err(|_| bad())?;
        let mut parts = v.splitn(3, ':');
        let (Some(id), Some(tok), meta) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let lease_id = LeaseId::parse(id).map_err(|_| bad())?;
        let token = tok.parse::<u64>().ok().filter(|t| *t > 0).ok_or_else(bad)?;
        Ok(Some(
            LockInfo::new(
                lease_id,
                FencingToken::new(token),
                HolderMeta::decode(meta.unwrap_or_default()),
            )
            .remaining((*pttl > 0).then(|| Duration::from_millis(*pttl as u64)))
            .waiters(Some((*live).max(0) as usize)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_fields_are_read_exactly() {
        let info =
            "# Memory\r\nmaxmemory:0\r\nmaxmemory_policy:allkeys-lru\r\nmaxmemory_policy_x:no\r\n";
        assert_eq!(info_field(info, "maxmemory_policy"), Some("allkeys-lru"));
        assert_eq!(info_field(info, "maxmemory"), Some("0"));
        assert_eq!(info_field(info, "absent"), None);
    }
}
