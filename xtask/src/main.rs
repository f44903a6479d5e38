//! `cargo xtask`: integration runs against real servers, the demo, and CI.

use std::process::{Command, ExitCode};
use std::time::Duration;

mod chaos;
mod demo;
mod images;
mod integration;
mod msrv;
mod worker_backend;

const USAGE: &str = "usage: cargo xtask <command>
  integration [--backend memory|redis|redlock|zk|pg|mongo|all] [--via auto|local|env|containers]
              [--also-containers backend[=image],...] [--lanes n] [--only part,...] [--require-all]
  demo        the inventory demo on every backend that can be provisioned
  chaos [--quick] [--seed n] [--lanes n] [--only part,...] [redis|redis-unfair|redlock|zk|zk-ensemble3|pg-lease|pg-advisory|pg-xact|dynamo|mongo...]
              fault injection with worker processes, judged by the history checker
  package     package each publishable crate and build it on its own, as crates.io would
  msrv        each published crate's rust-version covers what its dependencies declare
  ctrl-c-check
              SIGINT an integration run (local, then containers): nothing may be left
  runner-check
              a server that exits at once, or a worker that does, must fail the runners
  images [redis|postgres|zookeeper...]
              build local server images from Debian packages (debootstrap + docker import)
  bench [--quick] [redis|pg|pg-fsync|zk|dynamo...]
              the speed report (release build): target/bench/report.{md,json}, chart.svg
  ci          fmt, clippy, tests, docs, package (no build), the local Redis image, Ctrl-C check,
              chaos --quick, the runners' check, then integration (+ a Redis smoke leg via
              containers): the README's test command";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ok = match args.first().map(String::as_str) {
        Some("integration") => build_distlock() && rt.block_on(integration::run(&args[1..])),
        Some("demo") => build_distlock() && rt.block_on(interruptible(demo::run())),
        Some("ci") => {
            ci() && build_distlock()
                && timed("images", containers_image)
                && timed("ctrl-c check", ctrl_c_leaves_nothing)
                && timed("chaos --quick", || chaos_quick(&rt))
                && timed("runner check", runners_fail_when_they_must)
                && timed("integration", || {
                    // One run, one summary: every backend through the default providers, and
                    // Redis once more through the containers provider (local image).
                    let args: Vec<String> = [
                        "--lanes",
                        "3",
                        "--also-containers",
                        "redis=distlock/redis:local",
                    ]
                    .map(String::from)
                    .to_vec();
                    rt.block_on(integration::run(&args))
                })
        }
        Some("images") => images::run_images(&args[1..]),
        Some("package") => step(
            "package (each crate packaged and built on its own)",
            cargo()
                .args(["package", "--allow-dirty"])
                .args(published_args()),
        ),
        Some("msrv") => msrv::check(),
        Some("ctrl-c-check") => ctrl_c_leaves_nothing(),
        Some("runner-check") => runners_fail_when_they_must(),
        Some("chaos") => {
            step(
                "build chaos-worker",
                cargo().args(["build", "--quiet", "-p", "xtask", "--bin", "chaos-worker"]),
            ) && rt.block_on(interruptible(chaos::run(&args[1..])))
        }
        Some("bench") => step(
            "bench",
            cargo()
                .args(["run", "--release", "--quiet", "-p", "lock-bench", "--"])
                .args(&args[1..]),
        ),
        _ => {
            eprintln!("{USAGE}");
            false
        }
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs `fut`; on Ctrl-C drops it, which stops every server it started (by pid).
async fn interruptible(fut: impl std::future::Future<Output = bool>) -> bool {
    tokio::select! {
        ok = fut => ok,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted: stopping servers");
            false
        }
    }
}

/// A cargo command without the variables `cargo run` set for this process: a dependency's
/// build script that reads one (ring reads `CARGO_MANIFEST_DIR`) would otherwise run again,
/// and everything above it rebuild, in every build started from here.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (k, _) in std::env::vars_os() {
        if k.to_str()
            .is_some_and(|k| k.starts_with("CARGO_PKG_") || k.starts_with("CARGO_MANIFEST_"))
        {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Runs one CI phase and prints how long it took.
fn timed(name: &str, phase: impl FnOnce() -> bool) -> bool {
    let t0 = std::time::Instant::now();
    let ok = phase();
    println!("<== {name}: {:.0} s", t0.elapsed().as_secs_f64());
    ok
}

fn step(name: &str, cmd: &mut Command) -> bool {
    println!("==> {name}");
    let t0 = std::time::Instant::now();
    let status = cmd.status();
    println!("<== {name}: {:.0} s", t0.elapsed().as_secs_f64());
    match status {
        Ok(s) if s.success() => true,
        Ok(s) => {
            eprintln!("{name} failed ({s})");
            false
        }
        Err(e) => {
            eprintln!("{name} could not run: {e}");
            false
        }
    }
}

/// The `distlock` binary the Redis leg and the demo run, built if it is not there yet
/// (the build is not interruptible: a run that builds it first cannot be stopped by Ctrl-C
/// until it has started).
fn build_distlock() -> bool {
    let built = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("distlock").exists()))
        .unwrap_or(false);
    built
        || step(
            "build distlock",
            cargo().args(["build", "--quiet", "-p", "distlock"]),
        )
}

/// `cargo xtask chaos --quick`: every scenario against every local backend.
fn chaos_quick(rt: &tokio::runtime::Runtime) -> bool {
    step(
        "build chaos-worker",
        cargo().args(["build", "--quiet", "-p", "xtask", "--bin", "chaos-worker"]),
    ) && rt.block_on(interruptible(chaos::run(
        &["--quick", "--lanes", "4"].map(String::from),
    )))
}

/// Builds the local Redis image the CI's containers leg runs.
fn containers_image() -> bool {
    println!("\n=== images: distlock/redis:local (debootstrap + docker import)");
    images::run_images(&["redis".to_owned()])
}

/// Starts an integration run, interrupts it with SIGINT while its server runs, and checks
/// that the server process it started is gone.
fn ctrl_c_leaves_nothing() -> bool {
    println!("\n=== Ctrl-C stops every server the run started");
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("ctrl-c check: {e}");
            return false;
        }
    };
    let redis_servers = || {
        Command::new("pgrep")
            .args(["-c", "-x", "redis-server"])
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<usize>()
                    .ok()
            })
            .unwrap_or(0)
    };
    // The same through the containers provider (needs the local Redis image).
    let containers = || {
        Command::new("docker")
            .args(["ps", "-aq"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
            .unwrap_or(0)
    };
    sigint_leaves_nothing(
        &exe,
        "redis-server processes",
        &["--via", "local"],
        redis_servers,
        Duration::from_secs(30),
        Duration::from_millis(500),
    ) && sigint_leaves_nothing(
        &exe,
        "containers",
        &[
            "--via",
            "containers",
            "--image",
            "redis=distlock/redis:local",
        ],
        containers,
        Duration::from_secs(60),
        Duration::from_millis(1500),
    )
}

/// Starts `cargo xtask integration --backend redis <via>`, waits until `count` (of server
/// processes or containers) grows, sends SIGINT after `settle`, and checks that `count` is
/// back where it was.
fn sigint_leaves_nothing(
    exe: &std::path::Path,
    what: &str,
    via: &[&str],
    count: impl Fn() -> usize,
    appear_within: Duration,
    settle: Duration,
) -> bool {
    let before = count();
    let mut child = match Command::new(exe)
        .args(["integration", "--backend", "redis"])
        .args(via)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ctrl-c check ({what}): {e}");
            return false;
        }
    };
    let t = std::time::Instant::now();
    while count() <= before && t.elapsed() < appear_within {
        std::thread::sleep(Duration::from_millis(50));
    }
    let during = count();
    std::thread::sleep(settle);
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    // A run that does not stop on SIGINT fails the check instead of hanging CI.
    let exit_within = Duration::from_secs(90);
    let t = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(None) if t.elapsed() < exit_within => std::thread::sleep(Duration::from_millis(100)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!(
                    "still running {}s after SIGINT, killed",
                    exit_within.as_secs()
                ));
            }
            Ok(Some(s)) => break Ok(s),
            Err(e) => break Err(e.to_string()),
        }
    };
    std::thread::sleep(settle + Duration::from_millis(500));
    let after = count();
    let ok = during > before && after == before && status.is_ok();
    println!(
        "{what}: {before} before, {during} during, {after} after SIGINT ({status:?}): {}",
        if ok { "ok" } else { "FAILED" }
    );
    ok
}

/// The runners fail when they must: a server binary that exits at once fails
/// `integration` and `chaos`, and a worker that exits non-zero fails its scenario.
fn runners_fail_when_they_must() -> bool {
    println!("\n=== the runners fail when a server or a worker fails");
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("runner check: {e}");
            return false;
        }
    };
    let cases: [(&str, &str, &[&str]); 3] = [
        (
            "LOCK_REDIS_SERVER",
            "/bin/false",
            &["integration", "--backend", "redis", "--via", "local"],
        ),
        (
            "LOCK_REDIS_SERVER",
            "/bin/false",
            &[
                "chaos",
                "--quick",
                "--only",
                "acquire_cancel_release_loop",
                "redis",
            ],
        ),
        (
            "LOCK_CHAOS_WORKER",
            "/bin/false",
            &[
                "chaos",
                "--quick",
                "--only",
                "acquire_cancel_release_loop",
                "redis",
            ],
        ),
    ];
    let mut ok = true;
    for (var, value, args) in cases {
        let status = Command::new(&exe)
            .args(args)
            .env(var, value)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let failed = matches!(&status, Ok(s) if !s.success());
        println!(
            "{var}={value} xtask {}: {}",
            args.join(" "),
            if failed {
                "failed, as it must"
            } else {
                "DID NOT FAIL"
            }
        );
        ok &= failed;
    }
    ok
}

fn ci() -> bool {
    step("fmt", cargo().args(["fmt", "--all", "--", "--check"]))
        && step(
            "clippy",
            cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        )
        && step("unit tests", cargo().args(["test", "--workspace"]))
        && timed("feature check", features_alone)
        && step(
            "docs",
            // The published crates: the others are tools of this repository.
            cargo()
                .args(["doc", "--no-deps"])
                .args(published_args())
                .env("RUSTDOCFLAGS", "-D warnings"),
        )
        && timed("rust-version check", msrv::check)
        && step(
            // Building each packaged crate on its own (`cargo xtask package`) compiles the
            // dependency tree once per crate: too slow for every CI run.
            "publish --dry-run (manifests and file lists, in dependency order)",
            cargo()
                .args(["publish", "--dry-run", "--no-verify", "--allow-dirty"])
                .args(published_args()),
        )
}

/// Each backend crate checked and linted on its own (its features resolved for it alone,
/// not unified with the workspace's), with no default features and with each of its
/// features. Its unit tests ran in the workspace's run; they are the same here but for the
/// ones of a feature left out.
fn features_alone() -> bool {
    const BACKENDS: [(&str, &[&str]); 6] = [
        ("lock-core", &["testing"]),
        ("lock-redis", &["tls"]),
        ("lock-pg", &["tls"]),
        ("lock-zk", &["tls"]),
        ("lock-mongo", &[]),
        ("lock-dynamo", &[]),
    ];
    BACKENDS.iter().all(|(krate, features)| {
        std::iter::once(None)
            .chain(features.iter().map(Some))
            .all(|feature| {
                let mut cmd = cargo();
                cmd.args([
                    "clippy",
                    "--quiet",
                    "--lib",
                    "--tests",
                    "-p",
                    krate,
                    "--no-default-features",
                ]);
                if let Some(f) = feature {
                    cmd.args(["--features", f]);
                }
                cmd.args(["--", "-D", "warnings"]);
                step(
                    &format!(
                        "{krate}: no default features{}",
                        feature.map_or(String::new(), |f| format!(" + {f}"))
                    ),
                    &mut cmd,
                )
            })
    })
}

/// The crates published on their own, in dependency order.
pub(crate) const PUBLISHED: [&str; 8] = [
    "lock-core",
    "lock-conformance",
    "lock-redis",
    "lock-pg",
    "lock-zk",
    "lock-mongo",
    "lock-dynamo",
    "distlock",
];

/// `-p name` for each published crate.
fn published_args() -> Vec<&'static str> {
    PUBLISHED.iter().flat_map(|c| ["-p", c]).collect()
}
