//! `cargo xtask`: integration runs against real servers, the demo, and CI.

use std::process::{Command, ExitCode};

mod demo;
mod integration;

const USAGE: &str = "usage: cargo xtask <command>
  integration [--backend memory|redis|redlock|zk|pg|mongo|all] [--via auto|local|env|containers] [--require-all]
  demo        the inventory demo on every backend that can be provisioned
  ci          fmt, clippy, tests, docs, package, then integration (the README's test command)";

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
        Some("integration") => rt.block_on(interruptible(integration::run(&args[1..]))),
        Some("demo") => rt.block_on(interruptible(demo::run())),
        Some("ci") => ci() && rt.block_on(interruptible(integration::run(&[]))),
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

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn step(name: &str, cmd: &mut Command) -> bool {
    println!("==> {name}");
    match cmd.status() {
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
        && step(
            "docs",
            cargo()
                .args(["doc", "--workspace", "--no-deps"])
                .env("RUSTDOCFLAGS", "-D warnings"),
        )
        && step(
            "package",
            cargo().args([
                "package",
                "--no-verify",
                "-p",
                "lock-core",
                "-p",
                "lock-redis",
                "-p",
                "lock-pg",
                "-p",
                "lock-zk",
                "-p",
                "lock-mongo",
                "--allow-dirty",
            ]),
        )
}
