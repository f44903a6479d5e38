//! Server provisioning and the cross-backend integration run, shared by `cargo xtask`.

pub mod containers;
pub mod distlock_checks;
pub mod dynamo_extra;
pub mod mongo_extra;
pub mod pg_extra;
pub mod pg_net;
pub mod pg_safety;
pub mod redis_extra;
pub mod redis_net;
pub mod redis_safety;
pub mod secrets;
pub mod servers;
pub mod targets;
pub mod tls;
pub mod zk_extra;
pub mod zk_net;

use lock_conformance::{CaseResult, Outcome};

/// The workspace README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct WorkspaceReadme;
use tokio::time::Instant;

/// The case filter of this run (`cargo xtask integration --only <part of a name>`).
pub fn only() -> Option<String> {
    std::env::var("LOCK_ONLY").ok().filter(|v| !v.is_empty())
}

/// Whether `case` is selected by the filter `only` (comma-separated parts of names).
pub fn selected(only: &str, case: &str) -> bool {
    only.split(',').any(|part| case.contains(part))
}

/// Runs one named check and turns its outcome into a printed [`CaseResult`].
pub async fn check<F>(target: &str, case: &str, fut: F) -> CaseResult
where
    F: std::future::Future<Output = Result<String, String>>,
{
    if let Some(only) = only().filter(|o| !selected(o, case)) {
        return skip(target, case, &format!("not selected (--only {only})"));
    }
    let t = Instant::now();
    let outcome = match tokio::time::timeout(std::time::Duration::from_secs(120), fut).await {
        Ok(Ok(detail)) => Outcome::Passed { detail },
        Ok(Err(reason)) => Outcome::Failed { reason },
        Err(_) => Outcome::Failed {
            reason: "did not finish within 120 s".into(),
        },
    };
    let r = CaseResult {
        target: target.to_owned(),
        case: case.to_owned(),
        outcome,
        millis: t.elapsed().as_millis() as u64,
    };
    lock_conformance::print_result(&r);
    r
}

/// A check that cannot run in this setup, reported (and printed) as skipped with the reason.
pub fn skip(target: &str, case: &str, reason: &str) -> CaseResult {
    let r = CaseResult {
        target: target.to_owned(),
        case: case.to_owned(),
        outcome: Outcome::Skipped {
            reason: reason.to_owned(),
        },
        millis: 0,
    };
    lock_conformance::print_result(&r);
    r
}
