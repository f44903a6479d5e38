//! Settings for the MongoDB backend.

use std::fmt;
use std::time::Duration;

use lock_core::LockError;

/// Write and read guarantees of lock operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// `w: "majority"` writes (journaled) and `"majority"` reads: a grant survives the
    /// failover of the primary. The default.
    Majority,
    /// `w: 1` writes and `"local"` reads: faster, but a grant acknowledged by a primary
    /// that then fails over before replicating can be lost, and the key granted twice.
    Primary,
}

/// Settings for [`MongoBackend`](crate::MongoBackend).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MongoConfig {
    /// Connection string, `mongodb://host:port/?replicaSet=rs0` or `mongodb+srv://...`.
    /// Shown with its credentials redacted.
    pub url: String,
    /// Database of the lock collection. Default `distlock`.
    pub database: String,
    /// Collection of lease documents (one per key, never deleted). Default `leases`.
    pub collection: String,
    /// Default [`Durability::Majority`].
    pub durability: Durability,
    /// Bound on each operation. Default 5 s.
    pub op_timeout: Duration,
    /// The longest a waiter sleeps between attempts (with change streams, the fallback for
    /// a lost event; without, the polling cap). Default 1 s.
    pub poll_max: Duration,
}

impl fmt::Debug for MongoConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoConfig")
            .field("url", &redact(&self.url))
            .field("database", &self.database)
            .field("collection", &self.collection)
            .field("durability", &self.durability)
            .field("op_timeout", &self.op_timeout)
            .field("poll_max", &self.poll_max)
            .finish()
    }
}

/// `url` with its credentials replaced by `***`: the whole user information (a user name
/// alone can be a credential, as with X.509) and the values of query options that can carry
/// secrets (`authMechanismProperties` holds AWS session tokens).
pub(crate) fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (base, query) = rest
        .split_once('?')
        .map_or((rest, None), |(b, q)| (b, Some(q)));
    let base = match base.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => base.to_owned(),
    };
    let query = query.map(|q| {
        q.split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _))
                    if [
                        "authmechanismproperties",
                        "password",
                        "tlscertificatekeyfilepassword",
                    ]
                    .contains(&k.to_ascii_lowercase().as_str()) =>
                {
                    format!("{k}=***")
                }
                _ => p.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("&")
    });
    let scheme = if scheme.is_empty() {
        String::new()
    } else {
        format!("{scheme}://")
    };
    match query {
        Some(q) => format!("{scheme}{base}?{q}"),
        None => format!("{scheme}{base}"),
    }
}

impl MongoConfig {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            database: "distlock".into(),
            collection: "leases".into(),
            durability: Durability::Majority,
            op_timeout: Duration::from_secs(5),
            poll_max: Duration::from_secs(1),
        }
    }

    /// Sets the database name.
    #[must_use]
    pub fn database(mut self, v: impl Into<String>) -> Self {
        self.database = v.into();
        self
    }

    /// Sets the collection name.
    #[must_use]
    pub fn collection(mut self, v: impl Into<String>) -> Self {
        self.collection = v.into();
        self
    }

    /// Sets the durability.
    #[must_use]
    pub fn durability(mut self, v: Durability) -> Self {
        self.durability = v;
        self
    }

    /// Sets the operation timeout.
    #[must_use]
    pub fn op_timeout(mut self, t: Duration) -> Self {
        self.op_timeout = t;
        self
    }

    /// Sets the polling cap.
    #[must_use]
    pub fn poll_max(mut self, t: Duration) -> Self {
        self.poll_max = t;
        self
    }

    /// Checks the settings before connecting.
    pub fn validate(&self) -> Result<(), LockError> {
        if !(self.url.starts_with("mongodb://") || self.url.starts_with("mongodb+srv://")) {
            return Err(LockError::InvalidConfig(format!(
                "MongoDB URL must start with mongodb:// or mongodb+srv://, got {:?}",
                redact(&self.url).chars().take(60).collect::<String>()
            )));
        }
        self.validate_settings()
    }

    /// Checks everything but the URL (a backend built on the caller's client has none).
    pub(crate) fn validate_settings(&self) -> Result<(), LockError> {
        check_name("database", &self.database, 63)?;
        check_name("collection", &self.collection, 120)?;
        if self.collection.starts_with("system") {
            return Err(LockError::InvalidConfig(
                "collection names starting with \"system\" are reserved".into(),
            ));
        }
        if self.op_timeout.is_zero() || self.poll_max.is_zero() {
            return Err(LockError::InvalidConfig(
                "op_timeout and poll_max must be greater than zero".into(),
            ));
        }
        Ok(())
    }
}

/// Names are restricted to `[A-Za-z0-9_-]`: a subset of what MongoDB accepts that needs no
/// quoting anywhere (no `$`, `.`, `/`, spaces or NUL).
pub(crate) fn check_name(what: &str, v: &str, max: usize) -> Result<(), LockError> {
    let ok = !v.is_empty()
        && v.len() <= max
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(LockError::InvalidConfig(format!(
            "{what} name {:?} must be 1 to {max} characters of A-Z, a-z, 0-9, _ and -",
            v.chars().take(60).collect::<String>()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_validated() {
        assert!(MongoConfig::new("mongodb://h:27017/?replicaSet=rs0")
            .validate()
            .is_ok());
        assert!(MongoConfig::new("mongodb+srv://cluster.example")
            .validate()
            .is_ok());
        let bad_urls = ["", "http://h", "h:27017", "postgres://h"];
        for u in bad_urls {
            assert!(MongoConfig::new(u).validate().is_err(), "{u}");
        }
        let c = MongoConfig::new("mongodb://h");
        for db in ["", "a.b", "a$b", "a b", "a/b", &"x".repeat(64)] {
            assert!(c.clone().database(db).validate().is_err(), "{db}");
        }
        for coll in ["", "system.x", "system_leases", "a.b", "$cmd"] {
            assert!(c.clone().collection(coll).validate().is_err(), "{coll}");
        }
        assert!(c.clone().op_timeout(Duration::ZERO).validate().is_err());
        assert!(c.collection("my-locks_2").validate().is_ok());
    }

    #[test]
    fn no_secret_in_debug_or_errors() {
        let secrets = ["s3cret", "AKIDtoken"];
        for url in [
            "mongodb://app:s3cret@h:27017/db?replicaSet=rs0",
            "mongodb+srv://app:s3cret@cluster.example/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:AKIDtoken",
            "mongodbx://app:s3cret@h",
            "app:s3cret@h",
        ] {
            let c = MongoConfig::new(url);
            let shown = format!("{c:?} {:?}", c.validate());
            for s in secrets {
                assert!(!shown.contains(s), "{s} shown in {shown}");
            }
            assert!(shown.contains("***"), "{shown}");
        }
        assert_eq!(
            redact("mongodb://h:1,h2:2/db?replicaSet=rs0"),
            "mongodb://h:1,h2:2/db?replicaSet=rs0"
        );
    }
}
