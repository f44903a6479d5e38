//! Settings for the PostgreSQL backends.

use std::str::FromStr;
use std::time::Duration;

use lock_core::LockError;

/// Settings for [`PgLocks`](crate::PgLocks).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PgConfig {
    /// Connection URL or key-value string, as `tokio-postgres` parses it
    /// (`postgres://user:pass@host:port/db`), with libpq's TLS parameters: `sslmode`
    /// (`disable`, `prefer` (the default), `require`, `verify-ca`, `verify-full`),
    /// `sslrootcert` (a PEM file, or `system`), `sslcert` and `sslkey`. Shown with the
    /// password redacted.
    pub url: String,
    /// The certificate authorities (PEM) that `verify-ca` and `verify-full` trust, instead of
    /// `sslrootcert` or the system's.
    pub tls_ca_pem: Option<Vec<u8>>,
    /// A client certificate chain and its private key (PEM), instead of `sslcert` and
    /// `sslkey`. The key never shows in Debug output.
    pub tls_client_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// Schema that holds the lock tables and functions. Default `distlock`. A plain SQL
    /// identifier: lowercase letters, digits and `_`, starting with a letter or `_`, at most
    /// 40 bytes (it is also the prefix of the notification channel).
    pub schema: String,
    /// Most connections this client opens. Session and transaction locks hold one per held
    /// lock and one per key being waited on; lease-row locks borrow one per statement.
    /// Default 16.
    pub pool_size: usize,
    /// Bound on connecting and on each statement. Default 5 s.
    pub op_timeout: Duration,
    /// Session and transaction modes: how often a held lock's session is confirmed (a
    /// probe). Default 1 s.
    pub probe_every: Duration,
    /// Session and transaction modes: how long the server keeps a silent holder's session
    /// (its `idle_session_timeout`, or `idle_in_transaction_session_timeout`, set for the
    /// holder's session only; PostgreSQL 14 or later). The lock is safe until this long
    /// after the last answered probe was sent, less a drift margin; it is `Uncertain` from
    /// the first failed probe. At least three times `probe_every`. Default 5 s.
    pub session_timeout: Duration,
    /// Lease mode: the longest a waiter sleeps between attempts when no release
    /// notification arrives (a lost notification, or a holder that died). Default 1 s.
    pub poll_max: Duration,
    /// Create the schema on first use (default). When off, call
    /// [`PgLocks::migrate`](crate::PgLocks::migrate) yourself (for example from a
    /// deployment step with more privileges).
    pub auto_migrate: bool,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &redact(&self.url))
            .field("tls_ca_pem", &self.tls_ca_pem.as_ref().map(|_| "<set>"))
            .field(
                "tls_client_pem",
                &self.tls_client_pem.as_ref().map(|_| "<set, key hidden>"),
            )
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("op_timeout", &self.op_timeout)
            .field("probe_every", &self.probe_every)
            .field("session_timeout", &self.session_timeout)
            .field("poll_max", &self.poll_max)
            .field("auto_migrate", &self.auto_migrate)
            .finish()
    }
}

/// `url` (a URL or a key-value string) with its password replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://").filter(|_| crate::tls::is_url(url)) {
        // The user info ends at the last `@`: a careless password may hold `?`, `/` or `@`.
        // (An `@` in the query hides the host too: more hidden, never less.)
        let rest = match rest.rsplit_once('@') {
            Some((auth, host)) => match auth.split_once(':') {
                Some((user, _)) => format!("{user}:***@{host}"),
                None => format!("{auth}@{host}"),
            },
            None => rest.to_owned(),
        };
        let (base, query) = rest
            .split_once('?')
            .map_or((rest.as_str(), None), |(b, q)| (b, Some(q)));
        let query = query.map(|q| {
            q.split('&')
                .map(|p| match p.split_once('=') {
                    // Compared decoded, as tokio-postgres reads the key.
                    Some((k, _))
                        if percent_encoding::percent_decode_str(k)
                            .decode_utf8_lossy()
                            .eq_ignore_ascii_case("password") =>
                    {
                        format!("{k}=***")
                    }
                    _ => p.to_owned(),
                })
                .collect::<Vec<_>>()
                .join("&")
        });
        return match query {
            Some(q) => format!("{scheme}://{base}?{q}"),
            None => format!("{scheme}://{base}"),
        };
    }
    // Key-value form: `host=h password=secret user=u` (a quoted value may hold spaces).
    let mut out = String::new();
    let mut rest = url;
    while let Some(i) = rest.find("password") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "password".len()..];
        let trimmed = after.trim_start();
        match trimmed.strip_prefix('=') {
            Some(v) => {
                let v = v.trim_start();
                let end = if let Some(q) = v.strip_prefix('\'') {
                    q.find('\'').map_or(v.len(), |e| e + 2)
                } else {
                    v.find(char::is_whitespace).unwrap_or(v.len())
                };
                out.push_str("password=***");
                rest = &v[end..];
            }
            None => {
                out.push_str("password");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

impl PgConfig {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            tls_ca_pem: None,
            tls_client_pem: None,
            schema: "distlock".into(),
            pool_size: 16,
            op_timeout: Duration::from_secs(5),
            probe_every: Duration::from_secs(1),
            session_timeout: Duration::from_secs(5),
            poll_max: Duration::from_secs(1),
            auto_migrate: true,
        }
    }

    /// Trusts the certificate authorities in `pem` for `sslmode=verify-ca` and
    /// `verify-full`.
    #[must_use]
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca_pem = Some(pem.into());
        self
    }

    /// Presents the client certificate chain `cert_pem` with its private key `key_pem`.
    #[must_use]
    pub fn tls_client_pem(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls_client_pem = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Sets the schema name.
    #[must_use]
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Sets the pool size.
    #[must_use]
    pub fn pool_size(mut self, n: usize) -> Self {
        self.pool_size = n;
        self
    }

    /// Sets the operation timeout.
    #[must_use]
    pub fn op_timeout(mut self, t: Duration) -> Self {
        self.op_timeout = t;
        self
    }

    /// Sets the probe interval and the session timeout of session and transaction locks.
    #[must_use]
    pub fn session(mut self, probe_every: Duration, session_timeout: Duration) -> Self {
        self.probe_every = probe_every;
        self.session_timeout = session_timeout;
        self
    }

    /// Sets the lease-mode polling bound.
    #[must_use]
    pub fn poll_max(mut self, t: Duration) -> Self {
        self.poll_max = t;
        self
    }

    /// Turns schema creation on first use on or off.
    #[must_use]
    pub fn auto_migrate(mut self, on: bool) -> Self {
        self.auto_migrate = on;
        self
    }

    /// Checks the settings and parses the URL (and reads the TLS files it names), before
    /// anything is sent.
    pub fn validate(&self) -> Result<tokio_postgres::Config, LockError> {
        Ok(self.connect_parts()?.0)
    }

    /// The checked connection settings and their TLS connector.
    pub(crate) fn connect_parts(
        &self,
    ) -> Result<(tokio_postgres::Config, crate::tls::Connector), LockError> {
        self.validate_settings()?;
        let shown: String = redact(&self.url).chars().take(60).collect();
        let (url, tls) = crate::tls::split(&self.url)?;
        let pg = tokio_postgres::Config::from_str(&url)
            .map_err(|e| LockError::InvalidConfig(format!("bad PostgreSQL URL {shown:?}: {e}")))?;
        crate::tls::check(&tls, pg.get_ssl_mode())?;
        self.finish(pg, &tls, &shown)
    }

    /// The same for the application's own connection settings `pg` (the URL is not used).
    /// TLS follows `pg`'s `ssl_mode`: `disable`; `prefer` (encrypted when the server
    /// offers it, unverified); `require`: encrypted, and verified with the host name when
    /// [`PgConfig::tls_ca_pem`] is given.
    pub(crate) fn connect_parts_for(
        &self,
        pg: tokio_postgres::Config,
    ) -> Result<(tokio_postgres::Config, crate::tls::Connector), LockError> {
        use crate::tls::Mode;
        use tokio_postgres::config::SslMode;
        self.validate_settings()?;
        let mode = match pg.get_ssl_mode() {
            SslMode::Disable => Mode::Disable,
            SslMode::Prefer => Mode::Prefer,
            _ if self.tls_ca_pem.is_some() => Mode::VerifyFull,
            _ => Mode::Require,
        };
        let tls = crate::tls::Params {
            mode,
            ..Default::default()
        };
        self.finish(pg, &tls, "the application's settings")
    }

    fn validate_settings(&self) -> Result<(), LockError> {
        validate_ident("schema", &self.schema, 40)?;
        if self.pool_size < 2 {
            return Err(LockError::InvalidConfig(
                "pool_size must be at least 2 (one held lock and one waiter)".into(),
            ));
        }
        for (name, v) in [
            ("op_timeout", self.op_timeout),
            ("probe_every", self.probe_every),
            ("session_timeout", self.session_timeout),
            ("poll_max", self.poll_max),
        ] {
            if v.is_zero() {
                return Err(LockError::InvalidConfig(format!(
                    "{name} must be greater than zero"
                )));
            }
        }
        if self.session_timeout < self.probe_every * 3 {
            return Err(LockError::InvalidConfig(format!(
                "session_timeout {:?} must be at least three times probe_every {:?}: a probe \
                 and its retry must fit before the session's deadline",
                self.session_timeout, self.probe_every
            )));
        }
        if self.op_timeout > lock_core::options::MAX_OP_TIMEOUT
            || self.session_timeout > lock_core::options::MAX_LEASE
        {
            return Err(LockError::InvalidConfig(format!(
                "op_timeout must be at most {:?} and session_timeout at most {:?}",
                lock_core::options::MAX_OP_TIMEOUT,
                lock_core::options::MAX_LEASE
            )));
        }
        Ok(())
    }

    fn finish(
        &self,
        mut pg: tokio_postgres::Config,
        tls: &crate::tls::Params,
        shown: &str,
    ) -> Result<(tokio_postgres::Config, crate::tls::Connector), LockError> {
        if pg.get_hosts().is_empty() {
            return Err(LockError::InvalidConfig(format!(
                "PostgreSQL URL {shown:?} names no host"
            )));
        }
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(self.op_timeout);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("lock-pg");
        }
        let (connector, mode) = crate::tls::connector(
            tls,
            self.tls_ca_pem.as_deref(),
            self.tls_client_pem.as_ref(),
        )?;
        pg.ssl_mode(mode);
        Ok((pg, connector))
    }
}

/// Checks that `v` is a plain lowercase SQL identifier of at most `max` bytes, so it can be
/// placed in SQL text without quoting.
pub(crate) fn validate_ident(what: &str, v: &str, max: usize) -> Result<(), LockError> {
    let mut chars = v.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !first_ok || !rest_ok || v.len() > max {
        let shown: String = v.chars().take(60).collect();
        return Err(LockError::InvalidConfig(format!(
            "{what} {shown:?} is not a plain SQL identifier (lowercase letters, digits and _, \
             starting with a letter or _, at most {max} bytes)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(PgConfig::new("postgres://u@h/db").validate().is_ok());
        for bad in [
            "",
            "Lock",
            "1abc",
            "a-b",
            "a;drop table x",
            "a b",
            &"a".repeat(41),
        ] {
            let e = PgConfig::new("postgres://u@h/db")
                .schema(bad)
                .validate()
                .unwrap_err();
            assert!(matches!(e, LockError::InvalidConfig(_)), "{bad}: {e}");
        }
        assert!(validate_ident("table", "inventory_2", 63).is_ok());
    }

    #[test]
    fn urls_are_validated() {
        for bad in [
            "postgres://",
            "http://x",
            "postgres://h:notaport/db",
            "host=h port=x",
        ] {
            let e = PgConfig::new(bad).validate().unwrap_err();
            assert!(matches!(e, LockError::InvalidConfig(_)), "{bad}: {e}");
        }
        let pg = PgConfig::new("host=127.0.0.1 user=me").validate().unwrap();
        assert_eq!(pg.get_application_name(), Some("lock-pg"));
    }

    #[test]
    fn passwords_never_show() {
        for (url, secret) in [
            ("postgres://app:s3cret@db.example:5432/shop", "s3cret"),
            (
                "postgres://app@db/shop?password=s3cret&sslmode=require",
                "s3cret",
            ),
            ("host=db user=app password=s3cret dbname=shop", "s3cret"),
            ("host=db password = 'se cret' user=app", "se cret"),
            // tokio-postgres decodes the keys of a URL's query too.
            ("postgres://app@db/shop?p%61ssword=s3cret", "s3cret"),
        ] {
            let c = PgConfig::new(url);
            let shown = format!("{c:?}");
            assert!(!shown.contains(secret), "{shown}");
            assert!(shown.contains("***"), "{shown}");
        }
        let e = PgConfig::new("postgres://app:s3cret@h:notaport/db")
            .validate()
            .unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
        assert_eq!(redact("host=db user=app"), "host=db user=app");
        for (url, secret) in [
            ("postgres://app:p?s3cret@db/shop", "s3cret"),
            ("postgres://app:pw/s3cret@db/shop?sslmode=require", "s3cret"),
            ("host=db application_name=x://y password=s3cret", "s3cret"),
        ] {
            let shown = redact(url);
            assert!(!shown.contains(secret), "{url}: {shown}");
        }
    }

    #[test]
    fn timings_are_validated() {
        let c = PgConfig::new("postgres://u@h/db");
        assert!(c.clone().op_timeout(Duration::ZERO).validate().is_err());
        assert!(c
            .clone()
            .session(Duration::from_secs(2), Duration::from_secs(1))
            .validate()
            .is_err());
        assert!(c
            .clone()
            .session(Duration::from_secs(2), Duration::from_secs(3))
            .validate()
            .is_err());
        assert!(c
            .clone()
            .session(Duration::from_secs(1), Duration::from_secs(3))
            .validate()
            .is_ok());
        assert!(c.pool_size(1).validate().is_err());
    }
}
