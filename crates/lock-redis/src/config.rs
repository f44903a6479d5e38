//! Settings for the Redis backends.

use std::fmt;
use std::time::Duration;

use lock_core::LockError;

/// Settings for [`RedisBackend`](crate::RedisBackend).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// Server URL, `redis://[user:pass@]host:port[/db]`, or `rediss://` for TLS (the `tls`
    /// feature, on by default). An ACL user and password go in the URL. Shown with the
    /// password redacted.
    pub url: String,
    /// For `rediss://`: the certificate authorities to trust (PEM), instead of the system's,
    /// for a server whose certificate a private CA signed.
    pub tls_ca_pem: Option<Vec<u8>>,
    /// For `rediss://` to a server that asks for client certificates (Redis does by
    /// default: `tls-auth-clients yes`): the certificate chain and its private key (PEM).
    /// The key never shows in Debug output.
    pub tls_client_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// Prefix of every key this backend writes. Default `lock:`. 1 to 64 characters,
    /// without spaces, control characters, `{` or `}`.
    pub namespace: String,
    /// Grant waiters in arrival order (default), or let any acquirer take a free key.
    pub fair: bool,
    /// Bound on connecting and on each command. Default 2 s.
    pub op_timeout: Duration,
    /// After each grant and fenced write, wait for this many replicas to acknowledge it
    /// (`WAIT n timeout`); if they do not, the grant is given back and acquire fails (a
    /// fenced write reports an error). Default off.
    pub replica_acks: Option<(usize, Duration)>,
    /// Accept a server whose `maxmemory-policy` may evict keys. Evicting a held lock gives
    /// the key to a second holder, and evicting a fenced resource forgets its fence: leave
    /// this off unless the server can never reach its memory limit. Default off.
    pub allow_eviction: bool,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact(&self.url))
            .field("tls_ca_pem", &self.tls_ca_pem.as_ref().map(|_| "<set>"))
            .field(
                "tls_client_pem",
                &self.tls_client_pem.as_ref().map(|_| "<set, key hidden>"),
            )
            .field("namespace", &self.namespace)
            .field("fair", &self.fair)
            .field("op_timeout", &self.op_timeout)
            .field("replica_acks", &self.replica_acks)
            .field("allow_eviction", &self.allow_eviction)
            .finish()
    }
}

/// `url` with the password (in the authority, or a `pass`/`password` query parameter)
/// replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    // The user info ends at the last `@`: a careless password may hold `?`, `/` or `@`.
    // (An `@` in the query hides the host too: more hidden, never less.)
    let url = match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((auth, host)) => match auth.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => format!("{scheme}://***@{host}"),
            },
            None => url.to_owned(),
        },
        None => url.to_owned(),
    };
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b.to_owned(), Some(q)),
        None => (url.clone(), None),
    };
    match query {
        None => base,
        Some(q) => {
            let params: Vec<String> = q
                .split('&')
                .map(|p| match p.split_once('=') {
                    // Compared as the redis crate reads the key: decoded, and without the
                    // tabs and line breaks its URL parser drops.
                    Some((k, _))
                        if ["pass", "password"].iter().any(|s| {
                            let k: String = k.chars().filter(|c| !"\t\n\r".contains(*c)).collect();
                            percent_encoding::percent_decode_str(&k)
                                .decode_utf8_lossy()
                                .eq_ignore_ascii_case(s)
                        }) =>
                    {
                        format!("{k}=***")
                    }
                    _ => p.to_owned(),
                })
                .collect();
            format!("{base}?{}", params.join("&"))
        }
    }
}

impl RedisConfig {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            tls_ca_pem: None,
            tls_client_pem: None,
            namespace: "lock:".into(),
            fair: true,
            op_timeout: Duration::from_secs(2),
            replica_acks: None,
            allow_eviction: false,
        }
    }

    /// Trusts the certificate authorities in `pem` (instead of the system's) for
    /// `rediss://`.
    #[must_use]
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca_pem = Some(pem.into());
        self
    }

    /// Presents the client certificate chain `cert_pem` with its private key `key_pem` on
    /// `rediss://` connections (mutual TLS).
    #[must_use]
    pub fn tls_client_pem(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls_client_pem = Some((cert_pem.into(), key_pem.into()));
        self
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

    /// Requires `replicas` acknowledgements within `timeout` after each grant and fenced
    /// write.
    #[must_use]
    pub fn replica_acks(mut self, replicas: usize, timeout: Duration) -> Self {
        self.replica_acks = Some((replicas, timeout));
        self
    }

    /// Accepts a server that may evict keys (see [`RedisConfig::allow_eviction`]).
    #[must_use]
    pub fn allow_eviction(mut self, allow: bool) -> Self {
        self.allow_eviction = allow;
        self
    }

    /// Checks the settings before connecting.
    pub fn validate(&self) -> Result<(), LockError> {
        let tls = self.url.starts_with("rediss://");
        if tls && !cfg!(feature = "tls") {
            return Err(LockError::InvalidConfig(
                "rediss:// needs lock-redis built with its `tls` feature".into(),
            ));
        }
        if !(tls
            || self.url.starts_with("redis://")
            || self.url.starts_with("redis+unix://")
            || self.url.starts_with("unix://"))
        {
            return Err(LockError::InvalidConfig(format!(
                "Redis URL must start with redis://, rediss:// or unix://, got {:?}",
                redact(&self.url).chars().take(60).collect::<String>()
            )));
        }
        if !tls && (self.tls_ca_pem.is_some() || self.tls_client_pem.is_some()) {
            return Err(LockError::InvalidConfig(
                "TLS certificates are set but the URL is not rediss://".into(),
            ));
        }
        self.validate_settings()
    }

    /// Checks everything but the URL (a backend built on the caller's client has none).
    pub(crate) fn validate_settings(&self) -> Result<(), LockError> {
        if self.namespace.is_empty()
            || self.namespace.len() > 64
            || self
                .namespace
                .chars()
                .any(|c| c.is_control() || c.is_whitespace() || c == '{' || c == '}')
        {
            return Err(LockError::InvalidConfig(
                "namespace must be 1 to 64 characters without spaces, control characters, { or }"
                    .into(),
            ));
        }
        if self.op_timeout.is_zero() || self.op_timeout > lock_core::options::MAX_OP_TIMEOUT {
            return Err(LockError::InvalidConfig(format!(
                "op_timeout must be greater than zero and at most {:?}",
                lock_core::options::MAX_OP_TIMEOUT
            )));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        let c = RedisConfig::new("redis://app:s3cret@db.example:6380/2");
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("redis://app:***@db.example:6380/2"),
            "{shown}"
        );
        assert_eq!(redact("redis://:pw@h:1"), "redis://:***@h:1");
        assert_eq!(redact("redis://tokenonly@h:1"), "redis://***@h:1");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        assert_eq!(
            redact("redis+unix:///run/r.sock?db=1&pass=s3cret"),
            "redis+unix:///run/r.sock?db=1&pass=***"
        );
        assert_eq!(
            redact("redis+unix:///run/r.sock?p%61ss=s3cret"),
            "redis+unix:///run/r.sock?p%61ss=***"
        );
        assert_eq!(
            redact("redis+unix:///run/r.sock?pa\tss=s3cret"),
            "redis+unix:///run/r.sock?pa\tss=***"
        );
        let e = RedisConfig::new("http://u:s3cret@h")
            .validate()
            .unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
        for url in ["redis://app:p?s3cret@h:1", "rediss://app:pw/s3cret@h:1/0"] {
            assert!(!redact(url).contains("s3cret"), "{}", redact(url));
        }
    }

    #[test]
    fn tls_settings_need_a_tls_url_and_hide_the_key() {
        let c = RedisConfig::new("redis://h").tls_ca_pem("ca");
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not rediss://"));
        let c = RedisConfig::new("rediss://h:6380").tls_client_pem("cert", "KEY-s3cret");
        assert_eq!(c.validate().is_ok(), cfg!(feature = "tls"));
        assert!(!format!("{c:?}").contains("KEY-s3cret"));
    }

    #[test]
    fn namespaces_cannot_hold_hash_tag_braces() {
        for ns in ["", "a b", "{x}", "x}", "x{", &"n".repeat(65)] {
            assert!(
                RedisConfig::new("redis://h")
                    .namespace(ns)
                    .validate()
                    .is_err(),
                "{ns:?}"
            );
        }
        assert!(RedisConfig::new("redis://h")
            .namespace("app:locks:")
            .validate()
            .is_ok());
    }
}
