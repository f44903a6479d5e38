//! TLS for `tcp+tls://` addresses: the client library's options from the configured PEM,
//! and a handshake of our own after a failed connect, to name the cause (the library
//! retries a refused handshake until its timeout and reports only the timeout).

use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use lock_core::LockError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use zookeeper_client as zk;

use crate::config::ZkConfig;

fn bad(m: impl Into<String>) -> LockError {
    LockError::InvalidConfig(format!("ZooKeeper TLS: {}", m.into()))
}

fn text<'a>(what: &str, pem: &'a [u8]) -> Result<&'a str, LockError> {
    std::str::from_utf8(pem).map_err(|_| bad(format!("{what} is not PEM text")))
}

/// The library's TLS options, or `None` when no address is `tcp+tls://`.
pub(crate) fn options(cfg: &ZkConfig) -> Result<Option<zk::TlsOptions>, LockError> {
    let Some(ca) = cfg.tls_ca_pem.as_deref().filter(|_| cfg.uses_tls()) else {
        return Ok(None);
    };
    // rustls needs a process-wide provider when more than one is compiled in.
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
    let mut o = zk::TlsOptions::new()
        .with_pem_ca(text("tls_ca_pem", ca)?)
        .map_err(|e| bad(format!("tls_ca_pem: {e}")))?;
    if let Some((cert, key)) = &cfg.tls_client_pem {
        // The key's parse error is not shown: it could quote the key.
        o = o
            .with_pem_identity(
                text("the client certificate", cert)?,
                text("the client key", key)?,
            )
            .map_err(|_| bad("tls_client_pem: not a PEM certificate chain and private key"))?;
    }
    Ok(Some(o))
}

/// After a failed connect: what a TLS handshake with the first `tcp+tls://` address says
/// about certificates, if anything (other failures, such as an unreachable or slow server,
/// are not configuration errors and are left to the caller's own error).
pub(crate) async fn diagnose(cfg: &ZkConfig) -> Option<String> {
    let cfg = cfg.clone();
    let look = tokio::task::spawn_blocking(move || handshake(&cfg));
    tokio::time::timeout(Duration::from_secs(5), look)
        .await
        .ok()?
        .ok()
        .flatten()
}

/// The certificate problem a handshake runs into, if any.
fn handshake(cfg: &ZkConfig) -> Option<String> {
    let (hosts, _) = cfg.addresses();
    let (_, addr) = hosts.into_iter().find(|(tls, _)| *tls)?;
    let (host, _) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(cfg.tls_ca_pem.as_deref().unwrap_or_default()) {
        roots.add(c.ok()?).ok()?;
    }
    let config = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match &cfg.tls_client_pem {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            let key = PrivateKeyDer::from_pem_slice(key).ok()?;
            config.with_client_auth_cert(chain, key).ok()?
        }
        None => config.with_no_client_auth(),
    };
    let name = ServerName::try_from(host.to_owned()).ok()?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).ok()?;
    let timeout = Duration::from_secs(2);
    let mut sock = addr
        .to_socket_addrs()
        .ok()?
        .find_map(|a| TcpStream::connect_timeout(&a, timeout).ok())?;
    sock.set_read_timeout(Some(timeout)).ok()?;
    if let Err(e) = conn.complete_io(&mut sock) {
        return certificate_problem(&e);
    }
    // TLS 1.3: a server that refuses the client's certificate says so after the handshake;
    // one that accepts it waits for the session request.
    sock.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let mut byte = [0u8; 1];
    // Bytes or the end of the stream: no refusal to report.
    let read = rustls::Stream::new(&mut conn, &mut sock).read(&mut byte);
    read.err().and_then(|e| certificate_problem(&e))
}

/// A refused certificate, on either side, explained; `None` for anything else.
fn certificate_problem(e: &std::io::Error) -> Option<String> {
    use rustls::AlertDescription as A;
    let text = e.to_string();
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(_) => Some(format!(
            "the server's certificate was not accepted (wrong CA, or a host name it does not \
             name?): {text}"
        )),
        rustls::Error::AlertReceived(A::CertificateRequired) => Some(format!(
            "the server asks for a client certificate (ZkConfig::tls_client_pem): {text}"
        )),
        rustls::Error::AlertReceived(
            A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::UnsupportedCertificate
            | A::AccessDenied,
        ) => Some(format!(
            "the server refused the client certificate (it asks for one, \
             ZkConfig::tls_client_pem, or does not trust the one given?): {text}"
        )),
        _ => None,
    }
}
