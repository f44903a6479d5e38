//! TLS for the connections to PostgreSQL, by libpq's rules: `sslmode` (`disable`, `allow`
//! (read as `prefer`), `prefer` (the default), `require`, `verify-ca`, `verify-full`),
//! `sslrootcert` (a PEM file, or `system`), `sslcert` and `sslkey` (a client certificate),
//! read from the URL or the key-value string, or given as PEM through
//! [`PgConfig`](crate::PgConfig).

use lock_core::LockError;

/// What libpq's `sslmode` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Mode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// The TLS settings taken out of a connection string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Params {
    pub(crate) mode: Mode,
    /// `sslrootcert`: a file, or `system`.
    pub(crate) root_cert: Option<String>,
    pub(crate) cert: Option<String>,
    pub(crate) key: Option<String>,
}

const KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

fn bad(msg: String) -> LockError {
    LockError::InvalidConfig(msg)
}

impl Params {
    fn set(&mut self, key: &str, value: &str) -> Result<(), LockError> {
        match key {
            "sslmode" => {
                self.mode = match value {
                    "disable" => Mode::Disable,
                    "prefer" | "allow" => Mode::Prefer,
                    "require" => Mode::Require,
                    "verify-ca" => Mode::VerifyCa,
                    "verify-full" => Mode::VerifyFull,
                    other => {
                        return Err(bad(format!(
                            "sslmode {:?} is not one of disable, allow, prefer, require, \
                             verify-ca, verify-full",
                            other.chars().take(20).collect::<String>()
                        )))
                    }
                }
            }
            "sslrootcert" => self.root_cert = Some(value.to_owned()),
            "sslcert" => self.cert = Some(value.to_owned()),
            _ => self.key = Some(value.to_owned()),
        }
        Ok(())
    }
}

/// Whether `url` is in URL form, by the rule `tokio-postgres` uses.
pub(crate) fn is_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// `sslmode` as `tokio-postgres` understands it: the verify modes are `require` to it, and
/// it has no `allow` (read as `prefer`, as this crate does).
fn for_driver(mode: &str) -> &str {
    match mode {
        "verify-ca" | "verify-full" => "require",
        "allow" => "prefer",
        other => other,
    }
}

/// Splits the TLS parameters off `url` (a URL or a key-value string); returns the rest,
/// for `tokio-postgres`, and the parameters. `sslmode` stays in the rest (the verify modes
/// as `require`), so that [`check`] can compare what both parsers read.
pub(crate) fn split(url: &str) -> Result<(String, Params), LockError> {
    let mut p = Params::default();
    if is_url(url) {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), p));
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some((k, v)) if KEYS.contains(&k) => {
                    let v = percent_encoding::percent_decode_str(v)
                        .decode_utf8_lossy()
                        .into_owned();
                    p.set(k, &v)?;
                    if k == "sslmode" {
                        kept.push(format!("sslmode={}", for_driver(&v)));
                    }
                }
                _ => kept.push(pair.to_owned()),
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, p));
    }
    // Key-value form: the TLS keys take plain values (no quotes, no spaces).
    let mut kept = Vec::new();
    let mut words = url.split_whitespace().peekable();
    while let Some(w) = words.next() {
        let key = w.split('=').next().unwrap_or_default();
        if !KEYS.contains(&key) {
            kept.push(w.to_owned());
            continue;
        }
        let value = match w.split_once('=') {
            Some((_, v)) if !v.is_empty() => v.to_owned(),
            // `key = value` or `key =value`
            _ => {
                let mut v = String::new();
                for next in words.by_ref() {
                    let part = next.trim_start_matches('=');
                    if !part.is_empty() {
                        v = part.to_owned();
                        break;
                    }
                }
                v
            }
        };
        p.set(key, &value)?;
        if key == "sslmode" {
            kept.push(format!("sslmode={}", for_driver(&value)));
        }
    }
    Ok((kept.join(" "), p))
}

/// Refuses a connection string whose `sslmode` this crate and `tokio-postgres` read
/// differently (an encoded key, a `?` where the query is not): TLS must never be weaker
/// than what the string asks for.
pub(crate) fn check(p: &Params, driver: tokio_postgres::config::SslMode) -> Result<(), LockError> {
    use tokio_postgres::config::SslMode;
    let same = matches!(
        (p.mode, driver),
        (Mode::Disable, SslMode::Disable)
            | (Mode::Prefer, SslMode::Prefer)
            | (
                Mode::Require | Mode::VerifyCa | Mode::VerifyFull,
                SslMode::Require
            )
    );
    if same {
        Ok(())
    } else {
        Err(bad(
            "the connection string's sslmode could not be read unambiguously (an encoded key, \
             or a ? or space where it does not belong?)"
                .into(),
        ))
    }
}

#[cfg(feature = "tls")]
pub(crate) use rustls_impl::{connector, Connector};

#[cfg(not(feature = "tls"))]
pub(crate) type Connector = tokio_postgres::NoTls;

/// Without the `tls` feature: no TLS, and a URL that requires it is refused.
#[cfg(not(feature = "tls"))]
pub(crate) fn connector(
    p: &Params,
    _ca_pem: Option<&[u8]>,
    _client_pem: Option<&(Vec<u8>, Vec<u8>)>,
) -> Result<(Connector, tokio_postgres::config::SslMode), LockError> {
    match p.mode {
        Mode::Disable | Mode::Prefer => Ok((
            tokio_postgres::NoTls,
            tokio_postgres::config::SslMode::Disable,
        )),
        _ => Err(bad(
            "this sslmode needs lock-pg built with its `tls` feature".into(),
        )),
    }
}

#[cfg(feature = "tls")]
mod rustls_impl {
    use std::sync::Arc;

    use lock_core::LockError;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::client::WebPkiServerVerifier;
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use rustls::{
        CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    };
    use tokio_postgres::config::SslMode;

    use super::{bad, Mode, Params};

    pub(crate) type Connector = tokio_postgres_rustls::MakeRustlsConnect;

    /// libpq's lenient modes. Without `chain`, any certificate (`prefer`, and `require`
    /// without a root certificate: encryption against eavesdroppers only); with it,
    /// `verify-ca`: the chain must lead to a trusted root, the host name is not checked
    /// (the WebPKI verifier checks the name after the chain). Either way the handshake's
    /// signatures are checked.
    #[derive(Debug)]
    struct Lenient {
        provider: Arc<CryptoProvider>,
        chain: Option<Arc<WebPkiServerVerifier>>,
    }

    impl ServerCertVerifier for Lenient {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            let Some(chain) = &self.chain else {
                return Ok(ServerCertVerified::assertion());
            };
            match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algorithms = &self.provider.signature_verification_algorithms;
            rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algorithms = &self.provider.signature_verification_algorithms;
            rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    fn read(what: &str, path: &str) -> Result<Vec<u8>, LockError> {
        std::fs::read(path).map_err(|e| bad(format!("cannot read {what} {path:?}: {e}")))
    }

    fn certs(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, LockError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("{what}: not PEM certificates: {e}")))?;
        if certs.is_empty() {
            return Err(bad(format!("{what}: no certificate in it")));
        }
        Ok(certs)
    }

    /// The roots `verify-ca` (or `require` with a root certificate) checks the chain
    /// against: given explicitly, as libpq requires, since a chain to a public CA with no
    /// name check would accept anyone's certificate.
    fn private_roots(p: &Params, ca_pem: Option<&[u8]>) -> Result<RootCertStore, LockError> {
        if ca_pem.is_none() && matches!(p.root_cert.as_deref(), None | Some("system")) {
            return Err(bad(
                "this sslmode checks the chain but not the host name: it needs the CA that \
                 signed the server's certificate (sslrootcert=<file> or PgConfig::tls_ca_pem); \
                 sslrootcert=system goes with sslmode=verify-full only"
                    .into(),
            ));
        }
        roots(p, ca_pem)
    }

    fn roots(p: &Params, ca_pem: Option<&[u8]>) -> Result<RootCertStore, LockError> {
        let mut store = RootCertStore::empty();
        let pem = match (ca_pem, p.root_cert.as_deref()) {
            (Some(pem), _) => Some(pem.to_vec()),
            (None, Some("system") | None) => None,
            (None, Some(path)) => Some(read("sslrootcert", path)?),
        };
        match pem {
            Some(pem) => {
                for c in certs("the root certificates", &pem)? {
                    store
                        .add(c)
                        .map_err(|e| bad(format!("a root certificate: {e}")))?;
                }
            }
            None => {
                for c in rustls_native_certs::load_native_certs().certs {
                    let _ = store.add(c);
                }
                if store.is_empty() {
                    return Err(bad(
                        "no certificate authority to verify the server with: give sslrootcert \
                         (a PEM file) or PgConfig::tls_ca_pem"
                            .into(),
                    ));
                }
            }
        }
        Ok(store)
    }

    /// The connector and the `sslmode` to give `tokio-postgres` for these settings.
    pub(crate) fn connector(
        p: &Params,
        ca_pem: Option<&[u8]>,
        client_pem: Option<&(Vec<u8>, Vec<u8>)>,
    ) -> Result<(Connector, SslMode), LockError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(format!("TLS: {e}")))?;
        // libpq: `require` with a root certificate given verifies as `verify-ca`.
        let given_root = ca_pem.is_some() || p.root_cert.is_some();
        let builder = match p.mode {
            Mode::VerifyFull => builder.with_root_certificates(roots(p, ca_pem)?),
            mode => {
                let chain = match mode {
                    Mode::VerifyCa => Some(chain_verifier(p, ca_pem, &provider)?),
                    Mode::Require if given_root => Some(chain_verifier(p, ca_pem, &provider)?),
                    _ => None,
                };
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(Lenient { provider, chain }))
            }
        };
        let client_pem = match (client_pem, &p.cert, &p.key) {
            (Some((c, k)), _, _) => Some((c.clone(), k.clone())),
            (None, Some(c), Some(k)) => Some((read("sslcert", c)?, read("sslkey", k)?)),
            (None, None, None) => None,
            _ => return Err(bad("sslcert and sslkey go together".into())),
        };
        let config = match client_pem {
            Some((cert, key)) => {
                let chain = certs("the client certificate", &cert)?;
                let key = PrivateKeyDer::from_pem_slice(&key)
                    .map_err(|_| bad("the client key is not a PEM private key".into()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| bad(format!("the client certificate: {e}")))?
            }
            None => builder.with_no_client_auth(),
        };
        let mode = match p.mode {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        };
        Ok((tokio_postgres_rustls::MakeRustlsConnect::new(config), mode))
    }

    fn chain_verifier(
        p: &Params,
        ca_pem: Option<&[u8]>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Arc<WebPkiServerVerifier>, LockError> {
        WebPkiServerVerifier::builder_with_provider(
            Arc::new(private_roots(p, ca_pem)?),
            provider.clone(),
        )
        .build()
        .map_err(|e| bad(format!("TLS: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_keys_are_taken_out_of_both_forms() {
        let (rest, p) = split(
            "postgres://u:pw@h:5432/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fca.pem",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:pw@h:5432/db?sslmode=require&application_name=x"
        );
        assert_eq!(p.mode, Mode::VerifyFull);
        assert_eq!(p.root_cert.as_deref(), Some("/ca.pem"));
        let (rest, p) =
            split("host=h user=u sslmode = verify-ca sslrootcert=/ca.pem dbname=d").unwrap();
        assert_eq!(rest, "host=h user=u sslmode=require dbname=d");
        assert_eq!(p.mode, Mode::VerifyCa);
        let (rest, p) = split("postgres://h/db").unwrap();
        assert_eq!((rest.as_str(), p.mode), ("postgres://h/db", Mode::Prefer));
        assert!(split("postgres://h/db?sslmode=bogus").is_err());
    }

    #[test]
    fn sslmode_read_differently_by_the_driver_is_refused() {
        use crate::PgConfig;
        for url in [
            "postgres://u:p?w@h/db?sslmode=require",
            "postgres://h/db?ssl%6Dode=require",
        ] {
            assert!(PgConfig::new(url).validate().is_err(), "{url}");
        }
        // libpq's `allow` is read as `prefer` (TLS first, when built with it), which
        // tokio-postgres knows.
        let mode = |url: &str| PgConfig::new(url).validate().map(|c| c.get_ssl_mode()).ok();
        assert!(mode("postgres://h/db?sslmode=prefer").is_some());
        for (allow, prefer) in [
            (
                "postgres://h/db?sslmode=allow",
                "postgres://h/db?sslmode=prefer",
            ),
            ("host=h sslmode=allow", "host=h sslmode=prefer"),
        ] {
            assert_eq!(mode(allow), mode(prefer), "{allow}");
        }
        // A key-value string holding `://` is still read as one.
        let kv = PgConfig::new("host=h application_name=svc://x sslmode=disable");
        assert_eq!(
            kv.validate().map(|c| c.get_ssl_mode()).ok(),
            Some(tokio_postgres::config::SslMode::Disable)
        );
    }

    #[cfg(feature = "tls")]
    #[test]
    fn chain_only_modes_need_a_private_ca() {
        use crate::PgConfig;
        for url in [
            "postgres://h/db?sslmode=verify-ca",
            "postgres://h/db?sslmode=verify-ca&sslrootcert=system",
            "postgres://h/db?sslmode=require&sslrootcert=system",
        ] {
            let e = PgConfig::new(url).validate().unwrap_err().to_string();
            assert!(e.contains("host name"), "{url}: {e}");
        }
        assert!(PgConfig::new("postgres://h/db?sslmode=require")
            .validate()
            .is_ok());
    }
}
