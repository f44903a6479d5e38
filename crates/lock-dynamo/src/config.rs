//! Settings for the DynamoDB backend.

use std::fmt;
use std::time::Duration;

use lock_core::LockError;

/// Settings for [`DynamoBackend`](crate::DynamoBackend).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DynamoConfig {
    /// Table of lock items (one per key, never deleted). Default `distlock`.
    pub table: String,
    /// Name of the table's partition key, a string. Default `key`.
    pub partition_key: String,
    /// Creates the table (on-demand billing, the partition key alone) when it does not
    /// exist. Default `false`: a missing table is a configuration error.
    pub create_table: bool,
    /// AWS region; `None` takes it from the environment (`AWS_REGION`, the profile).
    pub region: Option<String>,
    /// Endpoint URL, for DynamoDB Local or an emulator (`http://127.0.0.1:8000`); `None`
    /// for AWS's own.
    pub endpoint: Option<String>,
    /// Static credentials (access key id, secret access key); `None` takes the default
    /// chain (environment, profile, web identity, container or instance role).
    pub credentials: Option<(String, String)>,
    /// Bound on each request. Default 5 s.
    pub op_timeout: Duration,
    /// The longest a waiter sleeps between two looks at a held key (DynamoDB has no
    /// notifications). Default 1 s.
    pub poll_max: Duration,
}

impl fmt::Debug for DynamoConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamoConfig")
            .field("table", &self.table)
            .field("partition_key", &self.partition_key)
            .field("create_table", &self.create_table)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field(
                "credentials",
                &self
                    .credentials
                    .as_ref()
                    .map(|(id, _)| (id, "<secret hidden>")),
            )
            .field("op_timeout", &self.op_timeout)
            .field("poll_max", &self.poll_max)
            .finish()
    }
}

impl Default for DynamoConfig {
    fn default() -> Self {
        Self::new("distlock")
    }
}

impl DynamoConfig {
    /// Defaults for the table `table`.
    pub fn new(table: impl Into<String>) -> Self {
        Self {
            table: table.into(),
            partition_key: "key".into(),
            create_table: false,
            region: None,
            endpoint: None,
            credentials: None,
            op_timeout: Duration::from_secs(5),
            poll_max: Duration::from_secs(1),
        }
    }

    /// Sets the partition key's name.
    #[must_use]
    pub fn partition_key(mut self, name: impl Into<String>) -> Self {
        self.partition_key = name.into();
        self
    }

    /// Creates the table when it does not exist.
    #[must_use]
    pub fn create_table(mut self, create: bool) -> Self {
        self.create_table = create;
        self
    }

    /// Sets the region.
    #[must_use]
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Sets the endpoint URL (DynamoDB Local, an emulator).
    #[must_use]
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoint = Some(url.into());
        self
    }

    /// Sets static credentials.
    #[must_use]
    pub fn credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
    ) -> Self {
        self.credentials = Some((access_key_id.into(), secret_access_key.into()));
        self
    }

    /// Sets the operation timeout.
    #[must_use]
    pub fn op_timeout(mut self, t: Duration) -> Self {
        self.op_timeout = t;
        self
    }

    /// Sets the longest pause between two looks at a held key.
    #[must_use]
    pub fn poll_max(mut self, t: Duration) -> Self {
        self.poll_max = t;
        self
    }

    /// Checks the settings before connecting.
    pub fn validate(&self) -> Result<(), LockError> {
        let bad = |m: String| Err(LockError::InvalidConfig(m));
        // DynamoDB's own rules for table names.
        let t = &self.table;
        if t.len() < 3
            || t.len() > 255
            || !t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        {
            return bad(format!(
                "table name {t:?} must be 3 to 255 characters of A-Z, a-z, 0-9, _, - and ."
            ));
        }
        let k = &self.partition_key;
        if k.is_empty() || k.len() > 255 {
            return bad(format!("partition key name {k:?} must be 1 to 255 bytes"));
        }
        if crate::backend::ATTRIBUTES.contains(&k.as_str()) {
            return bad(format!(
                "partition key name {k:?} is one of the lock item's own attributes {:?}",
                crate::backend::ATTRIBUTES
            ));
        }
        if let Some(e) = &self.endpoint {
            let rest = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"));
            if rest.is_none_or(|r| r.is_empty() || r.contains(char::is_whitespace)) {
                return bad(format!("endpoint {e:?} must be an http:// or https:// URL"));
            }
        }
        if let Some(r) = &self.region {
            if r.is_empty() || !r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return bad(format!("region {r:?} is not a region name"));
            }
        }
        if let Some((id, secret)) = &self.credentials {
            if id.is_empty() || secret.is_empty() {
                return bad("credentials need an access key id and a secret".into());
            }
        }
        if self.op_timeout.is_zero() {
            return bad("op_timeout must be greater than zero".into());
        }
        if self.poll_max < Duration::from_millis(10) {
            return bad("poll_max must be at least 10 ms".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_validated_and_the_secret_hidden() {
        assert!(DynamoConfig::new("locks").validate().is_ok());
        for t in ["", "ab", "has space", "slash/x", &"x".repeat(256)] {
            assert!(DynamoConfig::new(t).validate().is_err(), "{t}");
        }
        let c = DynamoConfig::new("locks");
        assert!(c.clone().endpoint("localhost:8000").validate().is_err());
        assert!(c.clone().endpoint("http://").validate().is_err());
        assert!(c
            .clone()
            .endpoint("http://127.0.0.1:8000")
            .validate()
            .is_ok());
        assert!(c.clone().region("eu west").validate().is_err());
        assert!(c.clone().partition_key("").validate().is_err());
        assert!(c.clone().partition_key("owner").validate().is_err());
        assert!(c.clone().op_timeout(Duration::ZERO).validate().is_err());
        assert!(c.clone().credentials("AKIA", "").validate().is_err());
        let shown = format!("{:?}", c.credentials("AKIAEXAMPLE", "wJalr-s3cret"));
        assert!(
            !shown.contains("s3cret") && shown.contains("AKIAEXAMPLE"),
            "{shown}"
        );
    }
}
