//! PostgreSQL over the networks of managed services: TLS by libpq's `sslmode` rules with a
//! private CA, SCRAM passwords, the application's own pool. The TLS check starts a server
//! of its own.

use std::time::Duration;

use lock_core::LockClient;
use lock_pg::{PgConfig, PgLocks};
use tokio_postgres::NoTls;

use crate::servers::Postgres;
use crate::tls::Pki;

type Res<T> = Result<T, String>;

fn e2s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A lock cycle through `cfg`; whether the pooled connection is encrypted.
async fn cycle(cfg: PgConfig) -> Res<bool> {
    let locks = PgLocks::connect_with(cfg.op_timeout(Duration::from_secs(3)))
        .await
        .map_err(e2s)?;
    let c = LockClient::new(locks.lease_rows());
    c.acquire("net")
        .await
        .map_err(e2s)?
        .release()
        .await
        .map_err(e2s)?;
    let conn = locks.pool().get().await.map_err(e2s)?;
    let row = conn
        .query_one(
            "SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
            &[],
        )
        .await
        .map_err(e2s)?;
    Ok(row.get(0))
}

/// What a connection that must fail said; an error if it worked, was retryable, or does
/// not say what is wrong.
async fn refused(cfg: PgConfig, about: &str, secret: Option<&str>) -> Res<String> {
    let e = match cycle(cfg).await {
        Ok(_) => return Err("connected".into()),
        Err(e) => e,
    };
    if !e.contains(about) || !e.starts_with("invalid backend configuration") {
        return Err(format!(
            "not a configuration error that says {about:?}: {e}"
        ));
    }
    if let Some(s) = secret.filter(|s| e.contains(s)) {
        return Err(format!("the error shows the secret {s}: {e}"));
    }
    Ok(e)
}

/// A server with TLS on (its certificate from a private CA, for the name `localhost`) that
/// admits the role `app` only over TLS and with a SCRAM password: `verify-full` (CA given
/// as PEM, or as `sslrootcert`), `verify-ca` on a name the certificate lacks, and `prefer`
/// all lock and are encrypted; `verify-full` on that name, another CA, `disable`, and a
/// wrong password each fail with a clear, non-retryable error that shows no password.
pub(crate) async fn tls_and_scram() -> Res<String> {
    let pki = Pki::new()?;
    let dir = pki
        .ca
        .cert_file
        .parent()
        .ok_or("no certificate directory")?
        .to_owned();
    let status = std::process::Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&dir)
        .status()
        .map_err(e2s)?;
    if !status.success() {
        return Err("chown of the certificates failed".into());
    }
    let settings = [
        "ssl=on".to_owned(),
        format!("ssl_cert_file={}", pki.server.cert_file.display()),
        format!("ssl_key_file={}", pki.server.key_file.display()),
    ];
    let server = tokio::task::spawn_blocking(move || {
        Postgres::start_with(&settings.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .map_err(e2s)??;
    let (admin, conn) = tokio_postgres::connect(&server.url(), NoTls)
        .await
        .map_err(e2s)?;
    tokio::spawn(conn);
    // Through psql: the driver would log the statement, password and all, and the run
    // watches every log for it (`secrets`).
    server.psql(
        "SET password_encryption = 'scram-sha-256'; \
         CREATE ROLE app LOGIN PASSWORD 's3cret-pg'; \
         GRANT CREATE ON DATABASE postgres TO app;",
    )?;
    let hba = server.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).map_err(e2s)?;
    std::fs::write(
        &hba,
        format!(
            "hostssl all app 127.0.0.1/32 scram-sha-256\nhost all app 127.0.0.1/32 reject\n{old}"
        ),
    )
    .map_err(e2s)?;
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .map_err(e2s)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let port = server.port;
    let ca = pki.ca.cert_pem.clone();
    let at = |host: &str, query: &str| {
        format!("postgres://app:s3cret-pg@{host}:{port}/postgres?{query}")
    };
    let mut seen = Vec::new();
    for (name, cfg) in [
        (
            "verify-full, CA as PEM",
            PgConfig::new(at("localhost", "sslmode=verify-full")).tls_ca_pem(ca.clone()),
        ),
        (
            "verify-full, sslrootcert",
            PgConfig::new(at(
                "localhost",
                &format!(
                    "sslmode=verify-full&sslrootcert={}",
                    pki.ca.cert_file.display()
                ),
            )),
        ),
        (
            "verify-ca on 127.0.0.1",
            PgConfig::new(at("127.0.0.1", "sslmode=verify-ca")).tls_ca_pem(ca.clone()),
        ),
        ("prefer", PgConfig::new(at("127.0.0.1", "sslmode=prefer"))),
    ] {
        let encrypted = cycle(cfg).await.map_err(|e| format!("{name}: {e}"))?;
        if !encrypted {
            return Err(format!("{name}: the connection is not encrypted"));
        }
        seen.push(name);
    }
    let cancelled = cancelled_wait_over_tls(
        PgConfig::new(at("localhost", "sslmode=verify-full")).tls_ca_pem(ca.clone()),
        &admin,
    )
    .await?;
    let wrong_name = refused(
        PgConfig::new(at("127.0.0.1", "sslmode=verify-full")).tls_ca_pem(ca.clone()),
        "not valid for name",
        None,
    )
    .await
    .map_err(|e| format!("verify-full on 127.0.0.1: {e}"))?;
    let other_ca = refused(
        PgConfig::new(at("localhost", "sslmode=verify-full"))
            .tls_ca_pem(pki.other_ca.cert_pem.clone()),
        "UnknownIssuer",
        None,
    )
    .await
    .map_err(|e| format!("another CA: {e}"))?;
    let plain = refused(
        PgConfig::new(at("127.0.0.1", "sslmode=disable")),
        "pg_hba.conf",
        Some("s3cret-pg"),
    )
    .await
    .map_err(|e| format!("sslmode=disable: {e}"))?;
    let wrong_password = refused(
        PgConfig::new(format!(
            "postgres://app:n0t-the-pw-7@localhost:{port}/postgres?sslmode=verify-full"
        ))
        .tls_ca_pem(ca),
        "password authentication failed",
        Some("n0t-the-pw-7"),
    )
    .await
    .map_err(|e| format!("a wrong password: {e}"))?;
    drop(server);
    Ok(format!(
        "locked and encrypted with {seen:?}; {cancelled}; verify-full on 127.0.0.1: \
         {wrong_name}; another CA: {other_ca}; disable: {plain}; wrong password: \
         {wrong_password}"
    ))
}

/// An advisory-lock wait abandoned by its caller on a TLS connection is cancelled on the
/// server: no backend of the role is left waiting. (It passes with a plain cancel request
/// too: the server accepts one; the backend sends it over TLS as libpq does.)
async fn cancelled_wait_over_tls(cfg: PgConfig, admin: &tokio_postgres::Client) -> Res<String> {
    let locks = PgLocks::connect_with(cfg).await.map_err(e2s)?;
    let c = LockClient::new(locks.advisory())
        .with_options(lock_core::LockOptions::default().wait(lock_core::WaitPolicy::Forever));
    let held = c.acquire("tls-wait").await.map_err(e2s)?;
    let waiter = LockClient::new(locks.advisory())
        .with_options(lock_core::LockOptions::default().wait(lock_core::WaitPolicy::Forever));
    let waiting = || async {
        let row = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE usename = 'app' AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .map_err(e2s)?;
        Ok::<i64, String>(row.get(0))
    };
    let task = tokio::spawn(async move { waiter.acquire("tls-wait").await.map(|_| ()) });
    let t = tokio::time::Instant::now();
    while waiting().await? == 0 {
        if t.elapsed() > Duration::from_secs(5) {
            return Err("the waiter never waited on the server".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    let _ = task.await;
    let t = tokio::time::Instant::now();
    loop {
        let waiting = waiting().await?;
        if waiting == 0 {
            break;
        }
        if t.elapsed() > Duration::from_secs(5) {
            return Err(format!(
                "{waiting} backend(s) still wait for the lock 5 s after the waiter was dropped"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    held.release().await.map_err(e2s)?;
    Ok(format!(
        "an abandoned wait cancelled on the server in {:?}",
        t.elapsed()
    ))
}

/// A `PgLocks` built on the application's own `tokio_postgres::Config`: lease, advisory
/// and transaction-scoped locks work through it, with tokens rising across the modes.
pub(crate) async fn built_on_the_applications_config(url: &str) -> Res<String> {
    let pg: tokio_postgres::Config = url.parse().map_err(e2s)?;
    let locks = PgLocks::from_config(pg, PgConfig::new("").schema("own_config"))
        .await
        .map_err(e2s)?;
    let mut tokens = Vec::new();
    let clients = [
        LockClient::new(locks.lease_rows()),
        LockClient::new(locks.advisory()),
        LockClient::new(locks.transactional()),
    ];
    for c in clients {
        let g = c.acquire("own-config").await.map_err(e2s)?;
        tokens.push(g.token().get());
        g.release().await.map_err(e2s)?;
    }
    let client = locks.pool().get().await.map_err(e2s)?;
    client
        .batch_execute("DROP SCHEMA own_config CASCADE")
        .await
        .map_err(e2s)?;
    if tokens.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("tokens {tokens:?}"));
    }
    Ok(format!("tokens {tokens:?}"))
}
