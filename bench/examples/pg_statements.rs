//! The advisory grant's statement variants, sent by hand on one connection and timed
//! interleaved with `SELECT 1` (docs/benchmarks.md, session 13).
//!
//! ```text
//! LOCK_PG_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run --release -p lock-bench --example pg_statements
//! ```
//!
//! The server's `distlock` schema must exist (run any lock against it once). Prints the p50
//! of each variant over 40 rounds of 150 cycles (the first round is warm-up), as a ratio
//! to the `SELECT 1` p50 of the same rounds.

use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// How a variant's statements are sent and answered.
#[derive(Clone, Copy)]
enum Wait {
    /// Each statement's whole answer (up to ReadyForQuery), as `query_one` does.
    Whole,
    /// Each statement's first row only, as lock-pg does since session 13.
    FirstRow,
}

/// One variant: its grant and release, with their parameters' shapes.
struct Variant {
    name: &'static str,
    grant: Statement,
    release: Statement,
    /// The grant's parameters: (key, id, lease, meta, idle) or (id, lease, meta, idle).
    keyed: bool,
    wait: Wait,
}

async fn run(c: &Client, stmt: &Statement, params: &[&(dyn ToSql + Sync)], wait: Wait) -> Res<()> {
    match wait {
        Wait::Whole => {
            c.query_opt(stmt, params).await?;
        }
        Wait::FirstRow => {
            let rows = c.query_raw(stmt, params.iter().copied()).await?;
            futures::pin_mut!(rows);
            rows.next().await.transpose()?;
        }
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Res<()> {
    let url = std::env::var("LOCK_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let (c, conn) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(conn);
    let s = "distlock";
    let draw = format!(
        "CASE WHEN current_setting('lock_pg.{s}_meta', true) IS NULL \
         THEN {s}.first_token() ELSE nextval('{s}.token_seq') END"
    );
    let record = |p: &str| {
        format!(
            "CASE WHEN current_setting('lock_pg.{s}_meta', true) IS DISTINCT FROM {p} \
             THEN {s}.record_holder({p}, true) END"
        )
    };
    let idle = |p: &str| {
        format!(
            "CASE WHEN current_setting('server_version_num')::int >= 140000 \
             THEN set_config('idle_session_timeout', {p}, false) END"
        )
    };
    // `cond` lets a variant that does not use a parameter still name its type.
    let two_node = |cols: &str, cond: &str| {
        format!(
            "SELECT x.tok{cols} FROM (SELECT CASE WHEN pg_try_advisory_lock($1) THEN {draw} END \
             AS tok OFFSET 0) x WHERE x.tok IS NOT NULL{cond}"
        )
    };
    let named = format!(
        ", set_config('application_name', 'lk ' || $2 || ' ' || x.tok, false), {}, {}",
        record("$3"),
        idle("$4")
    );
    let unnamed = format!(", {}, {}", record("$3"), idle("$4"));
    let s12 = format!(
        "WITH l AS MATERIALIZED (SELECT pg_try_advisory_lock($2) AS ok), \
         t AS MATERIALIZED (SELECT {draw} AS tok FROM l WHERE l.ok), \
         g AS MATERIALIZED (SELECT CASE WHEN t.tok > coalesce((SELECT f.token FROM {s}.fence f \
             WHERE f.key = $1), 0) THEN t.tok ELSE {s}.token_above($1) END AS tok FROM t) \
         SELECT g.tok, set_config('application_name', 'lk ' || $3 || ' ' || g.tok, false), {}, {} \
         FROM g",
        record("$4"),
        idle("$5")
    );
    let release = format!(
        "SELECT pg_advisory_unlock($1), {}, set_config('application_name', $2, false)",
        idle("'0'")
    );
    let release_unnamed = format!(
        "SELECT pg_advisory_unlock($1), {} WHERE $2 <> ''",
        idle("'0'")
    );
    let one = c.prepare("SELECT 1").await?;
    let variants = [
        Variant {
            name: "bare try + unlock",
            grant: c
                .prepare("SELECT pg_try_advisory_lock($1) WHERE $2 <> '' AND $3 <> '' AND $4 <> ''")
                .await?,
            release: c
                .prepare("SELECT pg_advisory_unlock($1) WHERE $2 <> ''")
                .await?,
            keyed: false,
            wait: Wait::Whole,
        },
        Variant {
            name: "session 12's grant + release",
            grant: c.prepare(&s12).await?,
            release: c.prepare(&release).await?,
            keyed: true,
            wait: Wait::Whole,
        },
        Variant {
            name: "two-node plan",
            grant: c.prepare(&two_node(&named, "")).await?,
            release: c.prepare(&release).await?,
            keyed: false,
            wait: Wait::Whole,
        },
        Variant {
            name: "two-node plan, no holder name",
            grant: c.prepare(&two_node(&unnamed, " AND $2 <> ''")).await?,
            release: c.prepare(&release_unnamed).await?,
            keyed: false,
            wait: Wait::Whole,
        },
        Variant {
            name: "two-node plan, at the row (lock-pg)",
            grant: c.prepare(&two_node(&named, "")).await?,
            release: c.prepare(&release).await?,
            keyed: false,
            wait: Wait::FirstRow,
        },
    ];
    let (id, lease, meta, idle_ms, app) = (
        42_i64,
        "0123456789abcdef0123456789abcdef",
        "meta",
        "30000",
        "app",
    );
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); variants.len() + 1];
    for round in 0..40 {
        for (k, slot) in times.iter_mut().enumerate() {
            for _ in 0..150 {
                let t = Instant::now();
                match k.checked_sub(1).map(|i| &variants[i]) {
                    None => {
                        c.query_one(&one, &[]).await?;
                    }
                    Some(v) => {
                        if v.keyed {
                            run(&c, &v.grant, &[&"k1", &id, &lease, &meta, &idle_ms], v.wait)
                                .await?;
                        } else {
                            run(&c, &v.grant, &[&id, &lease, &meta, &idle_ms], v.wait).await?;
                        }
                        run(&c, &v.release, &[&id, &app], v.wait).await?;
                    }
                }
                if round > 0 {
                    slot.push(t.elapsed());
                }
            }
        }
    }
    let p50 = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e6
    };
    let base = p50(&mut times[0]);
    println!("{:40} p50 {base:6.1} µs  1.000 x", "SELECT 1");
    for (v, t) in variants.iter().zip(times.iter_mut().skip(1)) {
        let p = p50(t);
        println!("{:40} p50 {p:6.1} µs  {:.3} x", v.name, p / base);
    }
    Ok(())
}
