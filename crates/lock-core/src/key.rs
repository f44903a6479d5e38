//! Validated inputs: lock keys, lease ids and holder metadata.

use std::fmt;

use crate::error::LockError;

/// The longest key, in bytes, that `lock-core` accepts. Backends may narrow it
/// (see [`Capabilities::max_key_len`](crate::Capabilities::max_key_len)).
pub const MAX_KEY_LEN: usize = 512;

/// The name of a lock.
///
/// Rules, checked by [`LockKey::new`] before any I/O:
/// - between 1 and [`MAX_KEY_LEN`] bytes of UTF-8;
/// - no control characters (`U+0000`..=`U+001F`, `U+007F`..=`U+009F`), so keys are safe to
///   print, log and embed in paths, scripts and SQL parameters.
///
/// Backends may narrow these rules (for example a maximum length) and report a violation
/// with [`LockError::InvalidKey`], never with a panic.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockKey(String);

impl LockKey {
    /// Validates `key`.
    pub fn new(key: impl Into<String>) -> Result<Self, LockError> {
        let key = key.into();
        if key.is_empty() {
            return Err(LockError::invalid_key(&key, "key is empty"));
        }
        if key.len() > MAX_KEY_LEN {
            return Err(LockError::invalid_key(
                &key,
                format!("key is {} bytes, the maximum is {MAX_KEY_LEN}", key.len()),
            ));
        }
        if let Some(c) = key.chars().find(|c| c.is_control()) {
            return Err(LockError::invalid_key(
                &key,
                format!("key contains the control character U+{:04X}", c as u32),
            ));
        }
        Ok(Self(key))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Checks a backend's narrower length limit.
    pub fn check_len(&self, max: usize) -> Result<(), LockError> {
        if self.0.len() > max {
            return Err(LockError::invalid_key(
                &self.0,
                format!(
                    "key is {} bytes, this backend allows at most {max}",
                    self.0.len()
                ),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A unique id for one acquisition, made by the client before the first request is sent.
///
/// Backends store it with the lease so that renew and release are owner-checked, and so
/// that a request whose reply was lost can be found again (or cleaned up) by this id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeaseId(String);

impl LeaseId {
    /// A fresh random id: 128 random bits as 32 lowercase hex digits.
    pub fn random() -> Self {
        let v: u128 = rand::random();
        Self(format!("{v:032x}"))
    }

    /// Wraps an id read back from a store. Only hex digits and `-` are accepted (at most 64),
    /// so ids are safe in paths and names.
    pub fn parse(s: &str) -> Result<Self, LockError> {
        if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            return Err(LockError::Protocol(format!("malformed lease id {s:?}")));
        }
        Ok(Self(s.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who holds a lock, stored beside the lease so that others can read it with `inspect`
/// without acquiring.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HolderMeta {
    /// Host name of the holder.
    pub host: Option<String>,
    /// Process id of the holder.
    pub pid: Option<u32>,
    /// A free-form label (for example the job name).
    pub label: Option<String>,
}

/// The longest label accepted in [`HolderMeta`], in bytes.
pub const MAX_LABEL_LEN: usize = 256;

impl HolderMeta {
    /// Metadata describing this process: host name (from `HOSTNAME` or `/etc/hostname`) and pid.
    pub fn this_process() -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty() && h.len() <= MAX_LABEL_LEN);
        Self {
            host,
            pid: Some(std::process::id()),
            label: None,
        }
    }

    /// Sets the label.
    #[must_use]
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// Checks lengths and characters (same rules as keys).
    pub fn validate(&self) -> Result<(), LockError> {
        for (name, v) in [("host", &self.host), ("label", &self.label)] {
            if let Some(v) = v {
                if v.len() > MAX_LABEL_LEN || v.chars().any(|c| c.is_control()) {
                    return Err(LockError::InvalidOptions(format!(
                        "holder {name} must be at most {MAX_LABEL_LEN} bytes without control characters"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Encodes the metadata as `host\tpid\tlabel` (tabs cannot occur in validated fields).
    pub fn encode(&self) -> String {
        let pid = self.pid.map(|p| p.to_string()).unwrap_or_default();
        let host = self.host.as_deref().unwrap_or("");
        format!("{host}\t{pid}\t{}", self.label.as_deref().unwrap_or(""))
    }

    /// Decodes what [`HolderMeta::encode`] wrote; unknown or partial input gives empty fields.
    pub fn decode(s: &str) -> Self {
        let mut it = s.split('\t');
        let non_empty = |v: Option<&str>| v.filter(|v| !v.is_empty()).map(str::to_owned);
        let host = non_empty(it.next());
        let pid = it.next().and_then(|p| p.parse().ok());
        let label = non_empty(it.next());
        Self { host, pid, label }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        assert!(LockKey::new("").is_err());
        assert!(LockKey::new("a".repeat(MAX_KEY_LEN + 1)).is_err());
        assert!(LockKey::new("a\nb").is_err());
        assert!(LockKey::new("a".repeat(MAX_KEY_LEN)).is_ok());
        assert_eq!(LockKey::new("item:1/ü").unwrap().as_str(), "item:1/ü");
        let err = LockKey::new("").unwrap_err();
        assert!(matches!(err, LockError::InvalidKey { .. }), "{err}");
    }

    #[test]
    fn lease_ids_are_unique_and_parse() {
        let a = LeaseId::random();
        assert_ne!(a, LeaseId::random());
        assert_eq!(LeaseId::parse(a.as_str()).unwrap(), a);
        assert!(LeaseId::parse("../x").is_err());
    }

    #[test]
    fn meta_round_trips() {
        let m = HolderMeta::this_process().with_label("job");
        assert_eq!(HolderMeta::decode(&m.encode()), m);
        let hp = HolderMeta {
            host: Some("h".into()),
            pid: Some(42),
            label: None,
        };
        assert_eq!(hp.encode(), "h\t42\t");
        assert_eq!(HolderMeta::default().encode(), "\t\t");
        assert_eq!(
            HolderMeta::decode("garbage"),
            HolderMeta {
                host: Some("garbage".into()),
                pid: None,
                label: None
            }
        );
        assert!(HolderMeta::default().with_label("a\tb").validate().is_err());
    }
}
