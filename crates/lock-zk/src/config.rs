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
    /// Connect string: `host:port[,host:port...][/chroot]`. An address written
    /// `tcp+tls://host:port` is reached over TLS (the `tls` feature), checked against
    /// [`tls_ca_pem`](Self::tls_ca_pem) and the host name.
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
    /// The CA certificates (PEM) that signed the servers' certificates; needed by
    /// `tcp+tls://` addresses.
    pub tls_ca_pem: Option<Vec<u8>>,
    /// A client certificate chain and its private key (PEM), for servers that ask for one
    /// (`ssl.clientAuth=need`).
    pub tls_client_pem: Option<(Vec<u8>, Vec<u8>)>,
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
            .field("tls_ca_pem", &self.tls_ca_pem.as_ref().map(|_| "<set>"))
            .field(
                "tls_client_pem",
                &self.tls_client_pem.as_ref().map(|_| "<set, key hidden>"),
            )
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
            tls_ca_pem: None,
            tls_client_pem: None,
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

    /// Trusts the CA certificates in `pem` for `tcp+tls://` addresses.
    #[must_use]
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca_pem = Some(pem.into());
        self
    }

    /// Presents this certificate chain and private key (PEM) to servers that ask for a
    /// client certificate.
    #[must_use]
    pub fn tls_client_pem(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls_client_pem = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Whether any address of the connect string is reached over TLS.
    pub(crate) fn uses_tls(&self) -> bool {
        self.addresses().0.iter().any(|(tls, _)| *tls)
    }

    /// The connect string's addresses (`host:port`, with whether it is `tcp+tls://`) and
    /// its chroot, split as the client library splits them: the chroot follows the last
    /// address.
    pub(crate) fn addresses(&self) -> (Vec<(bool, &str)>, Option<&str>) {
        if self.connect.is_empty() {
            return (Vec::new(), None);
        }
        let last = self.connect.split(',').count() - 1;
        let mut chroot = None;
        let hosts = self
            .connect
            .split(',')
            .enumerate()
            .map(|(i, part)| {
                let (tls, mut h) = match part.strip_prefix("tcp+tls://") {
                    Some(h) => (true, h),
                    None => (false, part.strip_prefix("tcp://").unwrap_or(part)),
                };
                if let Some(j) = h.find('/').filter(|_| i == last) {
                    chroot = Some(&h[j..]);
                    h = &h[..j];
                }
                (tls, h)
            })
            .collect();
        (hosts, chroot)
    }

    /// Checks the settings before connecting.
    pub fn validate(&self) -> Result<(), LockError> {
        let bad = |m: String| Err(LockError::InvalidConfig(m));
        let (hosts, chroot) = self.addresses();
        if hosts.is_empty() {
            return bad(format!(
                "ZooKeeper connect string {:?} names no host",
                self.connect
            ));
        }
        if self.connect.contains(char::is_whitespace) {
            return bad(format!(
                "ZooKeeper connect string {:?} holds white space",
                self.connect
            ));
        }
        for (tls, h) in &hosts {
            let Some((host, port)) = h.rsplit_once(':') else {
                return bad(format!("ZooKeeper address {h:?} must be host:port"));
            };
            if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                return bad(format!("ZooKeeper address {h:?} must be host:port"));
            }
            #[cfg(feature = "tls")]
            if *tls {
                let name = host.trim_start_matches('[').trim_end_matches(']');
                if rustls::pki_types::ServerName::try_from(name).is_err() {
                    return bad(format!(
                        "ZooKeeper address {h:?}: {name:?} is not a host name or IP address a \
                         certificate can name"
                    ));
                }
            }
            #[cfg(not(feature = "tls"))]
            let _ = tls;
        }
        // A plain address beside TLS ones would be a way around them (and around the
        // password, sent in the clear to it).
        if hosts.iter().any(|(t, _)| *t) && !hosts.iter().all(|(t, _)| *t) {
            return bad(format!(
                "ZooKeeper connect string {:?} mixes tcp+tls:// and plain addresses: write \
                 every address tcp+tls://, or none",
                self.connect
            ));
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
        let tls_settings = self.tls_ca_pem.is_some() || self.tls_client_pem.is_some();
        if self.uses_tls() {
            if !cfg!(feature = "tls") {
                return bad(
                    "tcp+tls:// addresses need lock-zk built with its `tls` feature".into(),
                );
            }
            if self.tls_ca_pem.is_none() {
                return bad(
                    "tcp+tls:// addresses need the CA that signed the servers' certificates \
                     (ZkConfig::tls_ca_pem)"
                        .into(),
                );
            }
        } else if tls_settings {
            return bad(
                "TLS certificates are set but no address of the connect string is tcp+tls://"
                    .into(),
            );
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

    #[test]
    fn tls_settings_need_a_tls_address_and_hide_the_key() {
        let tls = ZkConfig::new("tcp+tls://a:1,tcp+tls://b:2/app").tls_ca_pem("ca");
        assert_eq!(tls.validate().is_ok(), cfg!(feature = "tls"));
        let mixed = ZkConfig::new("tcp+tls://a:1,b:2").tls_ca_pem("ca");
        assert!(mixed.validate().is_err(), "a plain address beside TLS ones");
        assert!(ZkConfig::new("a:1, b:2").validate().is_err(), "white space");
        if cfg!(feature = "tls") {
            let odd = ZkConfig::new("tcp+tls://zk1..corp:2281").tls_ca_pem("ca");
            assert!(odd.validate().is_err(), "a name a certificate cannot hold");
            let v6 = ZkConfig::new("tcp+tls://[::1]:2281").tls_ca_pem("ca");
            assert!(v6.validate().is_ok(), "{:?}", v6.validate());
        }
        assert!(ZkConfig::new("tcp+tls://b:2").validate().is_err(), "no CA");
        assert!(ZkConfig::new("b:2").tls_ca_pem("ca").validate().is_err());
        assert!(ZkConfig::new("tcp+tls://:2")
            .tls_ca_pem("ca")
            .validate()
            .is_err());
        let shown = format!("{:?}", tls.tls_client_pem("cert", "KEY-s3cret"));
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
