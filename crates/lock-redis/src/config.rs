//! Settings for the Redis backends.

use std::time::Duration;

use lock_core::LockError;

/// Settings for [`RedisBackend`](crate::RedisBackend).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// Server URL, `redis://[user:pass@]host:port[/db]`.
    pub url: String,
    /// Prefix of every key this backend writes. Default `lock:`.
    pub namespace: String,
    /// Grant waiters in arrival order (default), or let any acquirer take a free key.
    pub fair: bool,
    /// Bound on connecting and on each command. Default 2 s.
    pub op_timeout: Duration,
    /// After each grant, wait for this many replicas to acknowledge it (`WAIT n timeout`);
    /// if they do not, the grant is given back and acquire fails. Default off.
    pub replica_acks: Option<(usize, Duration)>,
}

impl RedisConfig {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            namespace: "lock:".into(),
            fair: true,
            op_timeout: Duration::from_secs(2),
            replica_acks: None,
        }
    }

    /// Sets the key namespace.
    #[must_use]
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.namespace = ns.into();
        self
    }

    /// Sets fairness.
    #[must_use]
    pub fn fair(mut self, fair: bool) -> Self {
        self.fair = fair;
        self
    }

    /// Sets the operation timeout.
    #[must_use]
    pub fn op_timeout(mut self, t: Duration) -> Self {
        self.op_timeout = t;
        self
    }

    /// Requires `replicas` acknowledgements within `timeout` after each grant.
    #[must_use]
    pub fn replica_acks(mut self, replicas: usize, timeout: Duration) -> Self {
        self.replica_acks = Some((replicas, timeout));
        self
    }

    /// Checks the settings before connecting.
    pub fn validate(&self) -> Result<(), LockError> {
        if !(self.url.starts_with("redis://")
            || self.url.starts_with("rediss://")
            || self.url.starts_with("redis+unix://")
            || self.url.starts_with("unix://"))
        {
            return Err(LockError::InvalidConfig(format!(
                "Redis URL must start with redis://, rediss:// or unix://, got {:?}",
                self.url.chars().take(40).collect::<String>()
            )));
        }
        if self.namespace.is_empty()
            || self.namespace.len() > 64
            || self
                .namespace
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(LockError::InvalidConfig(
                "namespace must be 1 to 64 characters without spaces or control characters".into(),
            ));
        }
        if self.op_timeout.is_zero() {
            return Err(LockError::InvalidConfig(
                "op_timeout must be greater than zero".into(),
            ));
        }
        if let Some((n, t)) = self.replica_acks {
            if n == 0 || t.is_zero() {
                return Err(LockError::InvalidConfig(
                    "replica_acks needs at least one replica and a non-zero timeout".into(),
                ));
            }
        }
        Ok(())
    }
}
