//! `cargo xtask integration`: provision servers, run the one conformance suite (and each
//! backend's own checks) against every backend, tear everything down, summarize.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use lock_conformance::{run_suite, CaseResult, Outcome, SuiteReport};
use lock_tests::containers::{self, Kind};
use lock_tests::servers::{Postgres, Redis, ZooKeeper};
use lock_tests::{dynamo_extra, mongo_extra, pg_extra, redis_extra, targets, zk_extra};

const BACKENDS: [&str; 7] = ["memory", "redis", "redlock", "zk", "pg", "mongo", "dynamo"];

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

/// One leg of the run: a backend, its provider choice, its image overrides, and whether it
/// is a smoke leg.
type Leg = (&'static str, Via, Vec<(String, String)>, bool);

/// The run's settings.
struct Run {
    via: Via,
    images: Vec<(String, String)>,
    /// A leg that only proves its provider (`--also-containers`): a few suite cases, no
    /// backend-specific checks (the full leg runs those).
    smoke: bool,
}

/// The suite cases a smoke leg runs: exclusion, tokens, renewal, hand-off, inspection.
const SMOKE: &str = "exclusion_fenced_counter,release_then_reacquire_token_grows,auto_renewal_keeps_lock,release_wakes_waiter,tokens_monotone_across_clients,inspect_shows_holder";

impl Run {
    /// The suite's case filter for this leg.
    fn filter(&self) -> Option<String> {
        if self.smoke {
            Some(SMOKE.to_owned())
        } else {
            lock_tests::only()
        }
    }

    /// The provider as the summary names it.
    fn label(&self, provider: String) -> String {
        if self.smoke {
            format!("{provider} (smoke subset)")
        } else {
            provider
        }
    }
}

/// Runs the legs `args` asks for and prints the summary; false when a case failed or the
/// run was interrupted (Ctrl-C stops every server the run started before this returns).
pub(crate) async fn run(args: &[String]) -> bool {
    let secrets = lock_tests::secrets::Watch::install();
    let mut backend = "all".to_owned();
    let mut via = Via::Auto;
    let mut require_all = false;
    let mut lanes: usize = 1;
    let mut images = Vec::new();
    let mut also_containers: Vec<String> = Vec::new();
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
            "--image" => match it.next().and_then(|v| v.split_once('=')) {
                Some((k, v)) => images.push((k.to_owned(), v.to_owned())),
                None => {
                    eprintln!("--image needs kind=repo:tag (kind: redis, pg, zk, mongo)");
                    return false;
                }
            },
            // `--also-containers redis[=image],pg[=image]`: run these backends once more
            // through the containers provider (with that image for that leg only).
            "--also-containers" => {
                also_containers.extend(
                    it.next()
                        .map(|v| v.split(',').map(str::to_owned).collect::<Vec<_>>())
                        .unwrap_or_default(),
                );
            }
            "--require-all" => require_all = true,
            // `--lanes n`: n legs at a time (their checks mostly wait on servers).
            "--lanes" => lanes = it.next().and_then(|v| v.parse().ok()).unwrap_or(1).max(1),
            // Only the cases whose name contains this (the others are reported skipped).
            "--only" => std::env::set_var("LOCK_ONLY", it.next().cloned().unwrap_or_default()),
            other => {
                eprintln!("unknown argument {other}");
                return false;
            }
        }
    }
    let chosen: Vec<&'static str> = if backend == "all" {
        BACKENDS.to_vec()
    } else if let Some(b) = BACKENDS.iter().find(|b| **b == backend) {
        vec![*b]
    } else {
        eprintln!("unknown backend {backend}; one of {BACKENDS:?} or all");
        return false;
    };
    let mut plan: Vec<Leg> = chosen
        .iter()
        .map(|b| (*b, via, images.clone(), false))
        .collect();
    for spec in &also_containers {
        let (b, image) = match spec.split_once('=') {
            Some((b, i)) => (b, Some(i)),
            None => (spec.as_str(), None),
        };
        match BACKENDS.iter().find(|x| **x == b) {
            Some(b) => {
                let mut imgs = images.clone();
                if let Some(i) = image {
                    let kind = match *b {
                        "redis" | "redlock" => "redis",
                        other => other,
                    };
                    imgs.insert(0, (kind.to_owned(), i.to_owned()));
                }
                plan.push((b, Via::Containers, imgs, true));
            }
            None => {
                eprintln!("unknown backend {b} in --also-containers");
                return false;
            }
        }
    }
    // Legs run `lanes` at a time, each on servers of its own; the summary keeps their order.
    let mut queue: VecDeque<(usize, Leg)> = plan.into_iter().enumerate().collect();
    // The longest legs first, so that none runs alone at the end.
    queue
        .make_contiguous()
        .sort_by_key(|(_, (b, _, _, smoke))| {
            std::cmp::Reverse(match (*b, *smoke) {
                (_, true) => 0,
                ("zk" | "pg", _) => 3,
                ("redis", _) => 2,
                ("redlock" | "dynamo", _) => 1,
                _ => 0,
            })
        });
    let queue = Arc::new(Mutex::new(queue));
    // Ctrl-C stops each lane's leg inside its own task, while the runtime still runs:
    // removing a container needs the runtime, so a leg must not be left to its shutdown.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let interrupt = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = stop_tx.send(true);
        }
    });
    let mut tasks = Vec::new();
    for _ in 0..lanes {
        let queue = queue.clone();
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                let Some((i, leg)) = next else { break };
                tokio::select! {
                    line = run_leg(leg) => done.push((i, line)),
                    _ = stop.wait_for(|s| *s) => return None,
                }
            }
            Some(done)
        }));
    }
    let mut lines = Vec::new();
    let mut incomplete = false;
    for t in tasks {
        match t.await {
            Ok(Some(done)) => lines.extend(done),
            Ok(None) => incomplete = true,
            Err(e) => {
                eprintln!("integration lane failed: {e}");
                incomplete = true;
            }
        }
    }
    interrupt.abort();
    if *stop_rx.borrow() {
        eprintln!("interrupted: every server the run started is stopped");
    }
    if incomplete {
        return false;
    }
    lines.sort_by_key(|(i, _)| *i);
    let mut lines: Vec<Line> = lines.into_iter().map(|(_, l)| l).collect();
    let all: Vec<CaseResult> = lines.iter().flat_map(|l| l.results.clone()).collect();
    lines.push(Line {
        backend: "secrets".into(),
        provider: "this run's logs, metrics and results".into(),
        results: vec![secrets.result(&all)],
    });
    let (mut p, mut f, mut s) = (0, 0, 0);
    println!("\n=== summary");
    for l in &lines {
        let r = SuiteReport {
            results: l.results.clone(),
        };
        let (lp, lf, ls) = r.counts();
        println!(
            "{:<8} via {:<40} {lp} passed, {lf} failed, {ls} skipped",
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

/// Runs one leg: provisions its servers, runs the suite and the backend's own checks.
async fn run_leg((b, via, images, smoke): Leg) -> Line {
    println!(
        "\n=== {b} ({via:?}{})",
        if smoke { ", smoke subset" } else { "" }
    );
    let r = Run { via, images, smoke };
    match b {
        "memory" => Line {
            backend: b.into(),
            provider: "in-process".into(),
            results: run_suite(targets::memory(), r.filter().as_deref())
                .await
                .results,
        },
        "redis" => redis(&r).await,
        "redlock" => redlock(&r).await,
        "pg" => pg(&r).await,
        "zk" => zk(&r).await,
        "dynamo" => dynamo(&r).await,
        _ => mongo(&r).await,
    }
}

fn env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.is_empty())
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

/// Servers provisioned for one backend; dropping it stops them (local processes by pid,
/// containers removed).
struct Provisioned {
    urls: Vec<String>,
    provider: String,
    /// Local server handles when this run started them (checks that need server control
    /// run only then).
    local: Option<Box<dyn Any + Send>>,
    _containers: Vec<containers::Server>,
}

/// Finds servers for a backend: `env` where the variable is set, else containers where a
/// Docker engine answers and the image is present or can be pulled, else local binaries.
/// Err is the provider tried and why no server came up: a failure of the run for every
/// store this machine can run (only MongoDB, which cannot be obtained here, is skipped).
async fn provision<L>(
    r: &Run,
    kind: Kind,
    count: usize,
    env_var: &str,
    local: L,
) -> Result<Provisioned, (String, String)>
where
    L: FnOnce() -> Result<(Vec<String>, String, Box<dyn Any + Send>), String> + Send + 'static,
{
    let from_env = env(env_var);
    if let (Via::Auto | Via::Env, Some(v)) = (r.via, &from_env) {
        return Ok(Provisioned {
            urls: v.split(',').map(str::to_owned).collect(),
            provider: format!("env {env_var}"),
            local: None,
            _containers: Vec::new(),
        });
    }
    if r.via == Via::Env {
        return Err(("env".into(), format!("{env_var} is not set")));
    }
    let image = kind.image(&r.images);
    if matches!(r.via, Via::Auto | Via::Containers) {
        let img = image.clone();
        let usable = tokio::task::spawn_blocking(move || containers::ensure_image(&img))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        match usable {
            Ok(()) => {
                let mut servers = Vec::new();
                if kind == Kind::ZooKeeper && count > 1 {
                    // Members of one ensemble, not independent servers.
                    match containers::Server::start_zk_ensemble(&image, count).await {
                        Ok(s) => servers = s,
                        Err(e) => return Err(("containers".into(), e)),
                    }
                }
                while servers.len() < count {
                    match containers::Server::start(kind, &image).await {
                        Ok(s) => servers.push(s),
                        Err(e) => return Err(("containers".into(), e)),
                    }
                }
                let what = if kind == Kind::ZooKeeper && count > 1 {
                    "ensemble of"
                } else {
                    "x"
                };
                return Ok(Provisioned {
                    urls: servers.iter().map(containers::Server::url).collect(),
                    provider: format!("containers {count} {what} {image}"),
                    local: None,
                    _containers: servers,
                });
            }
            Err(e) if r.via == Via::Containers => {
                return Err((
                    "containers".into(),
                    format!(
                        "{e}; build a local one with `cargo xtask images` and pass \
                         --image or set {}",
                        kind.env_var()
                    ),
                ))
            }
            Err(_) => {}
        }
    }
    match tokio::task::spawn_blocking(local).await {
        Ok(Ok((urls, provider, handle))) => Ok(Provisioned {
            urls,
            provider,
            local: Some(handle),
            _containers: Vec::new(),
        }),
        Ok(Err(e)) => Err((
            "local".into(),
            format!("{e}; or start Docker with {image}, or set {env_var}"),
        )),
        Err(e) => Err(("local".into(), e.to_string())),
    }
}

async fn redis(r: &Run) -> Line {
    let p = match provision(r, Kind::Redis, 1, "LOCK_REDIS_URL", || {
        let s = Redis::start(false)?;
        Ok((
            vec![s.url()],
            format!("local redis-server :{}", s.port),
            Box::new(s) as Box<dyn Any + Send>,
        ))
    })
    .await
    {
        Ok(p) => p,
        Err((prov, why)) => return failed("redis", &prov, format!("no Redis server: {why}")),
    };
    let url = p.urls[0].clone();
    let mut results = Vec::new();
    let modes: &[(&str, bool)] = if r.smoke {
        &[("redis", true)]
    } else {
        &[("redis", true), ("redis-unfair", false)]
    };
    for &(name, fair) in modes {
        match targets::redis(name, url.clone(), fair) {
            Ok(t) => results.extend(run_suite(t, r.filter().as_deref()).await.results),
            Err(e) => return failed("redis", &p.provider, e),
        }
    }
    let skip = p.local.is_none().then_some(
        "starts local redis-server processes of its own: runs in the local leg (--via local)",
    );
    if !r.smoke {
        results.extend(redis_extra::run(skip).await);
    }
    Line {
        backend: "redis".into(),
        provider: r.label(p.provider),
        results,
    }
}

async fn redlock(r: &Run) -> Line {
    let p = match provision(r, Kind::Redis, 5, "LOCK_REDLOCK_URLS", || {
        let s = (0..5)
            .map(|_| Redis::start(false))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((
            s.iter().map(Redis::url).collect(),
            "local 5 x redis-server".to_owned(),
            Box::new(s) as Box<dyn Any + Send>,
        ))
    })
    .await
    {
        Ok(p) => p,
        Err((prov, why)) => return failed("redlock", &prov, format!("no Redis servers: {why}")),
    };
    let results = match targets::redlock(p.urls.clone()) {
        Ok(t) => run_suite(t, r.filter().as_deref()).await.results,
        Err(e) => return failed("redlock", &p.provider, e),
    };

    Line {
        backend: "redlock".into(),
        provider: r.label(p.provider),
        results,
    }
}

async fn pg(r: &Run) -> Line {
    let p = match provision(r, Kind::Postgres, 1, "LOCK_PG_URL", || {
        let s = Postgres::start()?;
        Ok((
            vec![s.url()],
            format!("local postgres :{}", s.port),
            Box::new(s) as Box<dyn Any + Send>,
        ))
    })
    .await
    {
        Ok(p) => p,
        Err((prov, why)) => return failed("pg", &prov, format!("no PostgreSQL server: {why}")),
    };
    let url = p.urls[0].clone();
    let mut results = Vec::new();
    for mode in targets::PgMode::ALL {
        match targets::pg(mode, url.clone()) {
            Ok(t) => results.extend(run_suite(t, r.filter().as_deref()).await.results),
            Err(e) => return failed("pg", &p.provider, e),
        }
    }
    let server = p
        .local
        .and_then(|b| b.downcast::<Postgres>().ok())
        .map(|b| *b);
    if !r.smoke {
        results.extend(pg_extra::run(&url, server).await);
    }
    Line {
        backend: "pg".into(),
        provider: r.label(p.provider),
        results,
    }
}

async fn zk(r: &Run) -> Line {
    let names = lock_conformance::case_names();
    let mut results = Vec::new();
    let mut providers = Vec::new();
    for members in [1usize, 3] {
        let name = if members == 1 { "zk" } else { "zk-ensemble3" };
        if members == 3 && env("LOCK_ZK_ADDR").is_some() && r.via != Via::Local {
            // The user's servers ran as the first topology; say so rather than pass quietly.
            results.extend(
                skipped(
                    name,
                    "env",
                    "LOCK_ZK_ADDR is set: the given servers ran as the first topology; unset it (or pass --via local) for the local three-node ensemble",
                    &names,
                )
                .results,
            );
            continue;
        }
        let p = match provision(r, Kind::ZooKeeper, members, "LOCK_ZK_ADDR", move || {
            let s = ZooKeeper::start(members)?;
            Ok((
                vec![s.connect_string()],
                format!("local zookeeper x{members}"),
                Box::new(s) as Box<dyn Any + Send>,
            ))
        })
        .await
        {
            Ok(p) => p,
            Err((prov, why)) => {
                results.extend(failed(name, &prov, format!("no ZooKeeper server: {why}")).results);
                continue;
            }
        };
        // Containers give `host:port`; env and local give connect strings already.
        let connect = p.urls.join(",");
        match targets::zk(name, connect.clone()) {
            Ok(t) => results.extend(run_suite(t, r.filter().as_deref()).await.results),
            Err(e) => return failed("zk", &p.provider, e),
        }
        let server = p
            .local
            .and_then(|b| b.downcast::<ZooKeeper>().ok())
            .map(|b| *b);
        if !r.smoke {
            results.extend(zk_extra::run(&connect, server, name).await);
        }
        providers.push(r.label(p.provider));
    }
    Line {
        backend: "zk".into(),
        provider: if providers.is_empty() {
            "none".into()
        } else {
            providers.join(" + ")
        },
        results,
    }
}

/// DynamoDB: `LOCK_DYNAMO_URL` (DynamoDB Local, a real endpoint), else moto's server
/// mode, an emulator of the wire API, installed under `target/moto`. Cases run against the
/// emulator are named `dynamo-moto/...`, never as DynamoDB's.
async fn dynamo(r: &Run) -> Line {
    let mut names = lock_conformance::case_names();
    names.extend(dynamo_extra::CHECKS);
    let from_env = env("LOCK_DYNAMO_URL");
    let (url, provider, target, _moto) = match (r.via, from_env) {
        (Via::Auto | Via::Env, Some(url)) => (url, "env LOCK_DYNAMO_URL".to_owned(), "dynamo", None),
        (Via::Env, None) => {
            return skipped("dynamo", "env", "LOCK_DYNAMO_URL is not set", &names)
        }
        (Via::Containers, _) => {
            return skipped(
                "dynamo",
                "containers",
                "no DynamoDB image here: the emulator (moto) runs from a virtual environment (--via local)",
                &names,
            )
        }
        _ => match tokio::task::spawn_blocking(lock_tests::servers::Moto::start).await {
            Ok(Ok(m)) => (m.url(), "local moto 5.2.5 (an emulator, not DynamoDB)".to_owned(), "dynamo-moto", Some(m)),
            Ok(Err(e)) => return failed("dynamo", "local moto", e),
            Err(e) => return failed("dynamo", "local moto", e.to_string()),
        },
    };
    let mut results = match targets::dynamo(url.clone(), target) {
        Ok(t) => run_suite(t, r.filter().as_deref()).await.results,
        Err(e) => return failed("dynamo", &provider, e),
    };
    if !r.smoke {
        results.extend(dynamo_extra::run(&url, target, _moto.is_some()).await);
    }
    Line {
        backend: target.into(),
        provider: r.label(provider),
        results,
    }
}

/// Why MongoDB is skipped on a machine like this one.
const NO_MONGO: &str = "no MongoDB server can be obtained on this machine (not in Debian, PyPI or crates.io, and no image registry is reachable): install mongod, run Docker with the mongo image, or set LOCK_MONGO_URL";

async fn mongo(r: &Run) -> Line {
    let mut names = lock_conformance::case_names();
    names.extend(mongo_extra::CHECKS);
    let p = match provision(r, Kind::Mongo, 1, "LOCK_MONGO_URL", || {
        Err(if lock_tests::servers::have("mongod") {
            "mongod is installed but the local provider does not start it".to_owned()
        } else {
            NO_MONGO.to_owned()
        })
    })
    .await
    {
        Ok(p) => p,
        Err((prov, why)) => return skipped("mongo", &prov, &why, &names),
    };
    let url = p.urls[0].clone();
    let mut results = match targets::mongo(url.clone()) {
        Ok(t) => run_suite(t, r.filter().as_deref()).await.results,
        Err(e) => return failed("mongo", &p.provider, e),
    };
    if !r.smoke {
        results.extend(mongo_extra::run(&url).await);
    }
    Line {
        backend: "mongo".into(),
        provider: r.label(p.provider),
        results,
    }
}
