//! ZooKeeper over TLS: a server of its own with a secure client port, its certificate
//! signed by a CA made at test time, client certificates required.

use std::time::Duration;

use lock_core::LockClient;
use lock_zk::{ZkBackend, ZkConfig};

use crate::servers::{free_port, ZooKeeper};
use crate::tls::Pki;

type Res<T> = Result<T, String>;

fn e2s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// What a connection that must fail said; an error if it connected, was retryable, or is
/// not about `about`.
async fn refused(cfg: ZkConfig, about: &[&str]) -> Res<String> {
    let shown = match ZkBackend::connect_with(cfg).await {
        Ok(_) => return Err("connected".into()),
        Err(e) if e.is_retryable() => return Err(format!("a retryable error: {e}")),
        Err(e) => e.to_string(),
    };
    if !about.iter().any(|a| shown.contains(a)) {
        return Err(format!("an error that does not say what is wrong: {shown}"));
    }
    Ok(shown)
}

/// `tcp+tls://` to a server that serves TLS only on its secure port and asks for client
/// certificates: with the CA and a client certificate, two holders in turn get rising
/// tokens; a wrong CA, a host name the certificate does not name, and no client
/// certificate each fail at connect with a clear, non-retryable error.
pub(crate) async fn tls_with_a_private_ca() -> Res<String> {
    let pki = Pki::new()?;
    let keystore = pki.server.key_file.with_extension("bundle.pem");
    std::fs::write(
        &keystore,
        format!("{}{}", pki.server.key_pem, pki.server.cert_pem),
    )
    .map_err(e2s)?;
    let port = free_port()?;
    let extra = format!(
        "secureClientPort={port}\nsecureClientPortAddress=127.0.0.1\n\
         serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory\n\
         ssl.keyStore.location={}\nssl.keyStore.type=PEM\n\
         ssl.trustStore.location={}\nssl.trustStore.type=PEM\nssl.clientAuth=need\n",
        keystore.display(),
        pki.ca.cert_file.display()
    );
    let _server = tokio::task::spawn_blocking(move || ZooKeeper::start_with(1, &extra))
        .await
        .map_err(e2s)??;
    let good = ZkConfig::new(format!("tcp+tls://localhost:{port}"))
        .session_timeout(Duration::from_secs(4))
        .op_timeout(Duration::from_secs(2))
        .tls_ca_pem(pki.ca.cert_pem.clone())
        .tls_client_pem(pki.client.cert_pem.clone(), pki.client.key_pem.clone());
    if format!("{good:?}").contains("PRIVATE KEY") {
        return Err("the client key shows in Debug".into());
    }
    let c = LockClient::new(
        ZkBackend::connect_with(good.clone())
            .await
            .map_err(|e| format!("with the right CA: {e}"))?,
    );
    let mut tokens = Vec::new();
    for _ in 0..2 {
        let g = c.acquire("tls").await.map_err(e2s)?;
        tokens.push(g.token().get());
        g.release().await.map_err(e2s)?;
    }
    if tokens[1] <= tokens[0] {
        return Err(format!("tokens did not rise: {tokens:?}"));
    }
    let wrong_ca = refused(
        good.clone().tls_ca_pem(pki.other_ca.cert_pem.clone()),
        &["UnknownIssuer"],
    )
    .await
    .map_err(|e| format!("another CA: {e}"))?;
    let wrong_name = refused(
        {
            let mut c = good.clone();
            c.connect = format!("tcp+tls://127.0.0.1:{port}");
            c
        },
        &["not valid for name"],
    )
    .await
    .map_err(|e| format!("a name the certificate does not hold: {e}"))?;
    let no_client_cert = refused(
        {
            let mut c = good;
            c.tls_client_pem = None;
            c
        },
        &["client certificate", "fatal alert"],
    )
    .await
    .map_err(|e| format!("no client certificate: {e}"))?;
    Ok(format!(
        "tokens {tokens:?} over TLS; another CA: {wrong_ca}; 127.0.0.1: {wrong_name}; no client certificate: {no_client_cert}"
    ))
}
