//! The whole conformance suite against the in-memory backend, and the checker's negative
//! control.

use lock_conformance::{memory_target, run_suite, scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes_on_memory() {
    let report = run_suite(memory_target(), None).await;
    let (passed, failed, skipped) = report.counts();
    println!("memory: {passed} passed, {failed} failed, {skipped} skipped");
    assert!(report.failures().is_empty(), "{:#?}", report.failures());
    // The in-memory backend is a TTL store with no backend-specific illegal key: only the
    // session cases and the illegal-key case do not apply.
    let skips: Vec<&str> = report
        .results
        .iter()
        .filter(|r| matches!(r.outcome, lock_conformance::Outcome::Skipped { .. }))
        .map(|r| r.case.as_str())
        .collect();
    assert_eq!(
        skips,
        [
            "session_extend_is_refused_and_keeps_the_lock",
            "lost_session_guard_cannot_touch_new_holder",
            "illegal_backend_key_rejected"
        ],
        "{skipped} skipped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_paused_holder_passes_the_checker() {
    let report = scenario::paused_holder(true).await.unwrap();
    assert!(report.ok(), "{:?}", report.violations);
    assert_eq!(report.refused_writes, 1, "the late write must be refused");
    assert_eq!(
        report.belief_overlaps, 1,
        "both workers believed they held the key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_unfenced_pause_is_flagged() {
    let report = scenario::paused_holder(false).await.unwrap();
    assert!(!report.ok(), "an unfenced paused holder must be flagged");
    let all = report.violations.join("\n");
    assert!(all.contains("lost update"), "{all}");
    assert!(all.contains("went backwards"), "{all}");
}
