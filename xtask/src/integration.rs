//! `cargo xtask integration`: provision servers, run the one conformance suite (and each
//! backend's own checks) against every backend, tear everything down, summarize.

use lock_conformance::{run_suite, CaseResult, Outcome, SuiteReport};
use lock_tests::servers::{Postgres, Redis, ZooKeeper};
use lock_tests::{mongo_extra, pg_extra, redis_extra, targets, zk_extra};

const BACKENDS: [&str; 6] = ["memory", "redis", "redlock", "zk", "pg", "mongo"];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Via {
    Auto,
    Local,
    Env,
    Containers,
}

struct Line {
    backend: String,
    provider: String,
    results: Vec<CaseResult>,
}

pub(crate) async fn run(args: &[String]) -> bool {
    let mut backend = "all".to_owned();
    let mut via = Via::Auto;
    let mut require_all = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--backend" => backend = it.next().cloned().unwrap_or_default(),
            "--via" => {
                via = match it.next().map(String::as_str) {
                    Some("auto") => Via::Auto,
                    Some("local") => Via::Local,
                    Some("env") => Via::Env,
                    Some("containers") => Via::Containers,
                    other => {
                        eprintln!("unknown --via {other:?}");
                        return false;
                    }
                }
            }
            "--require-all" => require_all = true,
            other => {
                eprintln!("unknown argument {other}");
                return false;
            }
        }
    }
    let chosen: Vec<&str> = if backend == "all" {
        BACKENDS.to_vec()
    } else if BACKENDS.contains(&backend.as_str()) {
        vec![backend.as_str()]
    } else {
        eprintln!("unknown backend {backend}; one of {BACKENDS:?} or all");
        return false;
    };
    let mut lines = Vec::new();
    for b in chosen {
        println!("\n=== {b}");
        let line = match b {
            "memory" => Line {
                backend: b.into(),
                provider: "in-process".into(),
                results: run_suite(targets::memory(), None).await.results,
            },
            "redis" => redis(via).await,
            "redlock" => redlock(via).await,
            "pg" => pg(via).await,
            "zk" => zk(via).await,
            _ => mongo(via).await,
        };
        lines.push(line);
    }
    let (mut p, mut f, mut s) = (0, 0, 0);
    println!("\n=== summary");
    for l in &lines {
        let r = SuiteReport {
            results: l.results.clone(),
        };
        let (lp, lf, ls) = r.counts();
        println!(
            "{:<8} via {:<28} {lp} passed, {lf} failed, {ls} skipped",
            l.backend, l.provider
        );
        for fail in r.failures() {
            println!("    FAILED {fail}");
        }
        (p, f, s) = (p + lp, f + lf, s + ls);
    }
    let json = serde_json::json!(lines
        .iter()
        .map(|l| serde_json::json!({"backend": l.backend, "provider": l.provider, "results": l.results}))
        .collect::<Vec<_>>());
    let _ = std::fs::create_dir_all("target/integration");
    let _ = std::fs::write("target/integration/report.json", json.to_string());
    println!("integration: {p} passed, {f} failed, {s} skipped");
    f == 0 && !(require_all && s > 0)
}

fn env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.is_empty())
}

/// What a provider decision came to: a provider name, or a skip reason.
fn no_containers(backend: &str) -> String {
    format!("the containers provider is not built yet; use --via local or set the {backend} URL variable")
}

fn skipped(backend: &str, provider: &str, reason: &str, cases: &[&str]) -> Line {
    println!("SKIPPED {backend}: {reason}");
    Line {
        backend: backend.into(),
        provider: provider.into(),
        results: cases
            .iter()
            .map(|c| CaseResult {
                target: backend.into(),
                case: (*c).into(),
                outcome: Outcome::Skipped {
                    reason: reason.into(),
                },
                millis: 0,
            })
            .collect(),
    }
}

fn failed(backend: &str, provider: &str, reason: String) -> Line {
    println!("FAIL {backend}: {reason}");
    Line {
        backend: backend.into(),
        provider: provider.into(),
        results: vec![CaseResult {
            target: backend.into(),
            case: "provision".into(),
            outcome: Outcome::Failed { reason },
            millis: 0,
        }],
    }
}

async fn redis(via: Via) -> Line {
    let names = lock_conformance::case_names();
    let (url, provider, server) = match (via, env("LOCK_REDIS_URL")) {
        (Via::Auto | Via::Env, Some(u)) => (u, "env LOCK_REDIS_URL".to_owned(), None),
        (Via::Env, None) => return skipped("redis", "env", "LOCK_REDIS_URL is not set", &names),
        (Via::Containers, _) => {
            return skipped(
                "redis",
                "containers",
                &no_containers("LOCK_REDIS_URL"),
                &names,
            )
        }
        _ => match tokio::task::spawn_blocking(|| Redis::start(false)).await {
            Ok(Ok(s)) => (s.url(), format!("local redis-server :{}", s.port), Some(s)),
            Ok(Err(e)) => {
                return skipped(
                    "redis",
                    "local",
                    &format!("no Redis server: {e}; or set LOCK_REDIS_URL"),
                    &names,
                )
            }
            Err(e) => return failed("redis", "local", e.to_string()),
        },
    };
    let mut results = Vec::new();
    match targets::redis("redis", url.clone(), true) {
        Ok(t) => results.extend(run_suite(t, None).await.results),
        Err(e) => return failed("redis", &provider, e),
    }
    match targets::redis("redis-unfair", url, false) {
        Ok(t) => results.extend(run_suite(t, None).await.results),
        Err(e) => return failed("redis", &provider, e),
    }
    if server.is_some() || via == Via::Local {
        results.extend(redis_extra::run().await);
    }
    drop(server);
    Line {
        backend: "redis".into(),
        provider,
        results,
    }
}

async fn redlock(via: Via) -> Line {
    let names = lock_conformance::case_names();
    let (urls, provider, servers) = match (via, env("LOCK_REDLOCK_URLS")) {
        (Via::Auto | Via::Env, Some(u)) => (
            u.split(',').map(str::to_owned).collect::<Vec<_>>(),
            "env LOCK_REDLOCK_URLS".to_owned(),
            Vec::new(),
        ),
        (Via::Env, None) => {
            return skipped("redlock", "env", "LOCK_REDLOCK_URLS is not set", &names)
        }
        (Via::Containers, _) => {
            return skipped(
                "redlock",
                "containers",
                &no_containers("LOCK_REDLOCK_URLS"),
                &names,
            )
        }
        _ => match tokio::task::spawn_blocking(|| {
            (0..5)
                .map(|_| Redis::start(false))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        {
            Ok(Ok(s)) => (
                s.iter().map(Redis::url).collect(),
                "local 5 x redis-server".to_owned(),
                s,
            ),
            Ok(Err(e)) => {
                return skipped("redlock", "local", &format!("no Redis server: {e}"), &names)
            }
            Err(e) => return failed("redlock", "local", e.to_string()),
        },
    };
    let results = match targets::redlock(urls) {
        Ok(t) => run_suite(t, None).await.results,
        Err(e) => return failed("redlock", &provider, e),
    };
    drop(servers);
    Line {
        backend: "redlock".into(),
        provider,
        results,
    }
}

async fn pg(via: Via) -> Line {
    let names = lock_conformance::case_names();
    if via == Via::Containers {
        return skipped("pg", "containers", &no_containers("LOCK_PG_URL"), &names);
    }
    let (url, provider, server) = match (via, env("LOCK_PG_URL")) {
        (Via::Auto | Via::Env, Some(u)) => (u, "env LOCK_PG_URL".to_owned(), None),
        (Via::Env, None) => return skipped("pg", "env", "LOCK_PG_URL is not set", &names),
        _ => match tokio::task::spawn_blocking(Postgres::start).await {
            Ok(Ok(s)) => (s.url(), format!("local postgres :{}", s.port), Some(s)),
            Ok(Err(e)) => {
                return skipped(
                    "pg",
                    "local",
                    &format!("no PostgreSQL server: {e}; or set LOCK_PG_URL"),
                    &names,
                )
            }
            Err(e) => return failed("pg", "local", e.to_string()),
        },
    };
    let mut results = Vec::new();
    for mode in targets::PgMode::ALL {
        match targets::pg(mode, url.clone()) {
            Ok(t) => results.extend(run_suite(t, None).await.results),
            Err(e) => return failed("pg", &provider, e),
        }
    }
    results.extend(pg_extra::run(&url, server).await);
    Line {
        backend: "pg".into(),
        provider,
        results,
    }
}

async fn zk(via: Via) -> Line {
    let names = lock_conformance::case_names();
    if via == Via::Containers {
        return skipped("zk", "containers", &no_containers("LOCK_ZK_ADDR"), &names);
    }
    if let (Via::Auto | Via::Env, Some(a)) = (via, env("LOCK_ZK_ADDR")) {
        let mut results = Vec::new();
        match targets::zk("zk", a) {
            Ok(t) => results.extend(run_suite(t, None).await.results),
            Err(e) => return failed("zk", "env LOCK_ZK_ADDR", e),
        }
        results.extend(zk_extra::run(None).await);
        return Line {
            backend: "zk".into(),
            provider: "env LOCK_ZK_ADDR".into(),
            results,
        };
    }
    if via == Via::Env {
        return skipped("zk", "env", "LOCK_ZK_ADDR is not set", &names);
    }
    let mut results = Vec::new();
    let mut provider = String::from("local");
    for members in [1usize, 3] {
        let name = if members == 1 { "zk" } else { "zk-ensemble3" };
        match tokio::task::spawn_blocking(move || ZooKeeper::start(members)).await {
            Ok(Ok(zk)) => {
                provider = "local zookeeper (1 and 3 members)".to_owned();
                match targets::zk(name, zk.connect_string()) {
                    Ok(t) => results.extend(run_suite(t, None).await.results),
                    Err(e) => return failed("zk", &provider, e),
                }
                results.extend(zk_extra::run(Some(zk)).await);
            }
            Ok(Err(e)) => {
                return skipped(
                    "zk",
                    "local",
                    &format!("no ZooKeeper server: {e}; or set LOCK_ZK_ADDR"),
                    &names,
                )
            }
            Err(e) => return failed("zk", "local", e.to_string()),
        }
    }
    Line {
        backend: "zk".into(),
        provider,
        results,
    }
}

/// Why MongoDB is skipped on a machine like this one.
const NO_MONGO: &str = "no MongoDB server: install mongod, run Docker with the mongo image (--via containers), or set LOCK_MONGO_URL; none can be obtained on this machine (not in Debian, PyPI or crates.io, and no image registry is reachable)";

async fn mongo(via: Via) -> Line {
    let mut names = lock_conformance::case_names();
    names.extend(mongo_extra::CHECKS);
    let url = match (via, env("LOCK_MONGO_URL")) {
        (Via::Auto | Via::Env, Some(u)) => u,
        (Via::Containers, _) => {
            return skipped(
                "mongo",
                "containers",
                &no_containers("LOCK_MONGO_URL"),
                &names,
            )
        }
        (Via::Env, None) => return skipped("mongo", "env", "LOCK_MONGO_URL is not set", &names),
        _ if lock_tests::servers::have("mongod") => return skipped(
            "mongo",
            "local",
            "mongod is installed but the local provider does not start it yet; set LOCK_MONGO_URL",
            &names,
        ),
        _ => return skipped("mongo", "none", NO_MONGO, &names),
    };
    let provider = "env LOCK_MONGO_URL".to_owned();
    let mut results = match targets::mongo(url.clone()) {
        Ok(t) => run_suite(t, None).await.results,
        Err(e) => return failed("mongo", &provider, e),
    };
    results.extend(mongo_extra::run(&url).await);
    Line {
        backend: "mongo".into(),
        provider,
        results,
    }
}
