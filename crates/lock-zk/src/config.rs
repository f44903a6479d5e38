//! Settings for the ZooKeeper backend.

use std::time::Duration;

use lock_core::LockError;

/// Who may touch the lock nodes this client creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ZkAcl {
    /// `world:anyone` with all permissions (ZooKeeper's default).
    Open,
    /// All permissions for the authenticated creator only (`auth` scheme); needs
    /// [`ZkConfig::digest_auth`] or another authentication.
    CreatorAll,
}

/// Settings for [`ZkBackend`](crate::ZkBackend).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ZkConfig {
    /// Connect string: `host:port[,host:port...][/chroot]`.
    pub connect: String,
    /// Absolute path under which lock nodes live (one child per key). Default `/distlock`.
    pub root: String,
    /// Session timeout asked of the server (it may negotiate it into its
    /// `[minSessionTimeout, maxSessionTimeout]`). The session is the lease: a holder that
    /// cannot reach the ensemble loses the lock when the server expires its session. Default
    /// 10 s.
    pub session_timeout: Duration,
    /// Bound on connecting and on each request. Default 5 s.
    pub op_timeout: Duration,
    /// ACL of created nodes. Default [`ZkAcl::Open`].
    pub acl: ZkAcl,
    /// `digest` authentication as `user:password`.
    pub digest: Option<String>,
}

impl std::fmt::Debug for ZkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZkConfig")
            .field("connect", &self.connect)
            .field("root", &self.root)
            .field("session_timeout", &self.session_timeout)
            .field("op_timeout", &self.op_timeout)
            .field("acl", &self.acl)
            .field("digest", &self.digest.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ZkConfig {
    /// Defaults for `connect`.
    pub fn new(connect: impl Into<String>) -> Self {
        Self {
            connect: connect.into(),
            root: "/distlock".into(),
            session_timeout: Duration::from_secs(10),
            op_timeout: Duration::from_secs(5),
            acl: ZkAcl::Open,
            digest: None,
        }
    }

    /// Sets the root path.
    #[must_use]
    pub fn root(mut self, root: impl Into<String>) -> Self {
        self.root = root.into();
        self
    }

    /// Sets the session timeout.
    #[must_use]
    pub fn session_timeout(mut self, t: Duration) -> Self {
        self.session_timeout = t;
        self
    }

    /// Sets the operation timeout.
    #[must_use]
    pub fn op_timeout(mut self, t: Duration) -> Self {
        self.op_timeout = t;
        self
    }

    /// Sets the ACL of created nodes.
    #[must_use]
    pub fn acl(mut self, acl: ZkAcl) -> Self {
        self.acl = acl;
        self
    }

    /// Authenticates with the `digest` scheme (`user:password`).
    #[must_use]
    pub fn digest_auth(mut self, user_password: impl Into<String>) -> Self {
        self.digest = Some(user_password.into());
        self
    }

    /// Checks the settings before connecting.
    pub fn validate(&self) -> Result<(), LockError> {
        let bad = |m: String| Err(LockError::InvalidConfig(m));
        let (hosts, chroot) = match self.connect.find('/') {
            Some(i) => (&self.connect[..i], Some(&self.connect[i..])),
            None => (self.connect.as_str(), None),
        };
        if hosts.is_empty() {
            return bad(format!(
                "ZooKeeper connect string {:?} names no host",
                self.connect
            ));
        }
        for h in hosts.split(',') {
            let h = h.trim();
            let h = h.strip_prefix("tcp://").unwrap_or(h);
            let Some((host, port)) = h.rsplit_once(':') else {
                return bad(format!("ZooKeeper address {h:?} must be host:port"));
            };
            if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                return bad(format!("ZooKeeper address {h:?} must be host:port"));
            }
        }
        if let Some(c) = chroot {
            check_abs_path("chroot", c)?;
        }
        check_abs_path("root", &self.root)?;
        if self.root == "/" {
            return bad("root must not be / (lock parents are created under it)".into());
        }
        if self.session_timeout < Duration::from_millis(100) {
            return bad("session_timeout must be at least 100 ms".into());
        }
        if self.op_timeout.is_zero() {
            return bad("op_timeout must be greater than zero".into());
        }
        if let Some(d) = &self.digest {
            if !d.contains(':') {
                return bad("digest auth must be user:password".into());
            }
        }
        if self.acl == ZkAcl::CreatorAll && self.digest.is_none() {
            return bad("ZkAcl::CreatorAll needs authentication (digest_auth)".into());
        }
        Ok(())
    }
}

fn check_abs_path(what: &str, p: &str) -> Result<(), LockError> {
    let ok = p.starts_with('/')
        && (p == "/" || !p.ends_with('/'))
        && p[1..]
            .split('/')
            .all(|c| p == "/" || (!c.is_empty() && c != "." && c != ".."))
        && !p.chars().any(crate::path::illegal_in_zk);
    if ok {
        Ok(())
    } else {
        Err(LockError::InvalidConfig(format!(
            "{what} {p:?} is not an absolute ZooKeeper path (/a/b, no empty, . or .. parts)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_validated() {
        assert!(ZkConfig::new("127.0.0.1:2181").validate().is_ok());
        assert!(ZkConfig::new("a:1,b:2/app/locks").validate().is_ok());
        for bad in [
            "",
            "host",
            "host:x",
            ":2181",
            "h:1/a//b",
            "h:1/a/../b",
            "/x",
        ] {
            assert!(ZkConfig::new(bad).validate().is_err(), "{bad}");
        }
        for root in ["", "/", "x", "/a/", "/a/./b"] {
            assert!(
                ZkConfig::new("h:1").root(root).validate().is_err(),
                "{root}"
            );
        }
        assert!(ZkConfig::new("h:1")
            .acl(ZkAcl::CreatorAll)
            .validate()
            .is_err());
        assert!(ZkConfig::new("h:1")
            .acl(ZkAcl::CreatorAll)
            .digest_auth("u:p")
            .validate()
            .is_ok());
        assert!(ZkConfig::new("h:1")
            .digest_auth("nocolon")
            .validate()
            .is_err());
        let shown = format!("{:?}", ZkConfig::new("h:1").digest_auth("u:secret"));
        assert!(!shown.contains("secret"));
    }
}
