//! Redis over the networks of managed services: TLS with a private CA and client
//! certificates, ACL users, the application's own client. Each check starts its own server.

use std::time::Duration;

use lock_core::{LockClient, LockError};
use lock_redis::redis;
use lock_redis::{FencedWrite, RedisBackend, RedisConfig, RedlockBackend, RedlockConfig};

use crate::servers::{free_port, Redis};
use crate::tls::Pki;

type Res<T> = Result<T, String>;

fn e2s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A lock cycle and a fenced write through `b`; returns the token.
async fn cycle(b: RedisBackend, key: &str) -> Res<u64> {
    let c = LockClient::new(b.clone());
    let g = c.acquire(key).await.map_err(e2s)?;
    match b
        .fenced_set(&format!("{key}-resource"), g.token(), "v")
        .await
        .map_err(e2s)?
    {
        FencedWrite::Applied(_) => {}
        other => return Err(format!("the fenced write answered {other:?}")),
    }
    let t = g.token().get();
    g.release().await.map_err(e2s)?;
    Ok(t)
}

/// What a connection that must fail said; an error if it connected, was retryable, or is
/// not about `about`.
async fn refused(cfg: RedisConfig, about: &[&str], secret: Option<&str>) -> Res<String> {
    let shown = match RedisBackend::connect_with(cfg).await {
        Ok(_) => return Err("connected".into()),
        Err(e) if e.is_retryable() => return Err(format!("a retryable error: {e}")),
        Err(e) => e.to_string(),
    };
    if !about.iter().any(|a| shown.contains(a)) {
        return Err(format!("an error that does not say what is wrong: {shown}"));
    }
    if let Some(s) = secret.filter(|s| shown.contains(s)) {
        return Err(format!("the error shows the secret {s}: {shown}"));
    }
    Ok(shown)
}

/// A Redis server with a TLS port whose certificate `pki`'s CA signed, asking for client
/// certificates; the server and its TLS port.
pub(crate) async fn tls_server(pki: &Pki) -> Res<(Redis, u16)> {
    let tls_port = free_port()?;
    let args = [
        "--tls-port".to_owned(),
        tls_port.to_string(),
        "--tls-cert-file".to_owned(),
        pki.server.cert_file.display().to_string(),
        "--tls-key-file".to_owned(),
        pki.server.key_file.display().to_string(),
        "--tls-ca-cert-file".to_owned(),
        pki.ca.cert_file.display().to_string(),
        "--tls-auth-clients".to_owned(),
        "yes".to_owned(),
    ];
    let server = tokio::task::spawn_blocking(move || {
        Redis::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[])
    })
    .await
    .map_err(e2s)??;
    Ok((server, tls_port))
}

/// `rediss://` to a server whose certificate a private CA signed, which asks for client
/// certificates (Redis's default): with the CA and a client certificate a lock cycle, a
/// fenced write and a Redlock of one TLS node work; a wrong CA, a host name the
/// certificate does not name, and no client certificate each fail at connect with a
/// clear, non-retryable error.
pub(crate) async fn tls_with_a_private_ca() -> Res<String> {
    let pki = Pki::new()?;
    let (_server, tls_port) = tls_server(&pki).await?;
    let url = format!("rediss://localhost:{tls_port}");
    let good = RedisConfig::new(url.clone())
        .tls_ca_pem(pki.ca.cert_pem.clone())
        .tls_client_pem(pki.client.cert_pem.clone(), pki.client.key_pem.clone());
    if format!("{good:?}").contains("PRIVATE KEY") {
        return Err("the client key shows in Debug".into());
    }
    let b = RedisBackend::connect_with(good.clone())
        .await
        .map_err(|e| format!("with the right CA: {e}"))?;
    let token = cycle(b, "tls").await?;
    // A node new to Redlock sits out the longest lease: a short one here.
    let redlock = RedlockBackend::connect_with(
        RedlockConfig::with_nodes(vec![good.clone()]).max_lease(Duration::from_secs(1)),
    )
    .await
    .map_err(|e| format!("a Redlock of one TLS node: {e}"))?;
    let c = LockClient::new(redlock)
        .with_options(lock_core::LockOptions::default().lease(Duration::from_millis(500)));
    c.acquire("tls-redlock")
        .await
        .map_err(e2s)?
        .release()
        .await
        .map_err(e2s)?;
    let wrong_ca = refused(
        good.clone().tls_ca_pem(pki.other_ca.cert_pem.clone()),
        &["UnknownIssuer"],
        None,
    )
    .await
    .map_err(|e| format!("another CA: {e}"))?;
    let wrong_name = refused(
        {
            let mut c = good.clone();
            c.url = format!("rediss://127.0.0.1:{tls_port}");
            c
        },
        &["not valid for name"],
        None,
    )
    .await
    .map_err(|e| format!("a name the certificate does not hold: {e}"))?;
    let no_client_cert = refused(
        RedisConfig::new(url).tls_ca_pem(pki.ca.cert_pem.clone()),
        &["client certificate"],
        None,
    )
    .await
    .map_err(|e| format!("no client certificate: {e}"))?;
    Ok(format!(
        "token {token} over TLS; another CA: {wrong_ca}; 127.0.0.1: {wrong_name}; no client certificate: {no_client_cert}"
    ))
}

/// An ACL user (the default user switched off): the right password works; no credentials
/// and a wrong password each fail at connect with a clear, non-retryable error that does
/// not show the password.
pub(crate) async fn acl_user_and_wrong_password() -> Res<String> {
    let server = tokio::task::spawn_blocking(|| Redis::start(false))
        .await
        .map_err(e2s)??;
    let admin = redis::Client::open(server.url()).map_err(e2s)?;
    let mut conn = admin
        .get_multiplexed_async_connection()
        .await
        .map_err(e2s)?;
    redis::cmd("ACL")
        .arg(&["SETUSER", "app", "on", ">s3cret-pw", "~*", "&*", "+@all"])
        .query_async::<()>(&mut conn)
        .await
        .map_err(e2s)?;
    redis::cmd("ACL")
        .arg(&["SETUSER", "default", "off"])
        .query_async::<()>(&mut conn)
        .await
        .map_err(e2s)?;
    let base = format!("127.0.0.1:{}", server.port);
    let cfg = RedisConfig::new(format!("redis://app:s3cret-pw@{base}"));
    if format!("{cfg:?}").contains("s3cret-pw") {
        return Err("the password shows in Debug".into());
    }
    let b = RedisBackend::connect_with(cfg)
        .await
        .map_err(|e| format!("the right password: {e}"))?;
    let token = cycle(b, "acl").await?;
    let anonymous = refused(
        RedisConfig::new(format!("redis://{base}")),
        &["refused access"],
        None,
    )
    .await
    .map_err(|e| format!("no credentials: {e}"))?;
    let wrong = refused(
        RedisConfig::new(format!("redis://app:n0t-the-pw-7@{base}")),
        &["refused access"],
        Some("n0t-the-pw-7"),
    )
    .await
    .map_err(|e| format!("a wrong password: {e}"))?;
    Ok(format!(
        "token {token} as user app; no credentials: {anonymous}; wrong password: {wrong}"
    ))
}

/// A backend built on the application's own `redis::Client`: a lock cycle and a blocked
/// waiter (which opens a connection of its own from that client) work.
pub(crate) async fn built_on_the_applications_client() -> Res<String> {
    let server = tokio::task::spawn_blocking(|| Redis::start(false))
        .await
        .map_err(e2s)??;
    let client = redis::Client::open(server.url()).map_err(e2s)?;
    let b = RedisBackend::from_client(client, RedisConfig::new("unused://"))
        .await
        .map_err(e2s)?;
    let c = LockClient::new(b.clone());
    let g = c.acquire("own-client").await.map_err(e2s)?;
    let c2 = c.clone();
    let waiter = tokio::spawn(async move {
        let g = c2.acquire("own-client").await?;
        let t = g.token();
        g.release().await?;
        Ok::<_, LockError>(t)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let first = g.token();
    g.release().await.map_err(e2s)?;
    let second = waiter.await.map_err(e2s)?.map_err(e2s)?;
    if second <= first {
        return Err(format!("tokens {first} then {second}"));
    }
    let token = cycle(b, "own-client-2").await?;
    Ok(format!(
        "tokens {first}, {second} (a blocked waiter), {token}"
    ))
}
