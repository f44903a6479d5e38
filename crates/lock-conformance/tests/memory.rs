//! The whole conformance suite against the in-memory backend, and the checker's negative
//! control.

use lock_conformance::{memory_target, run_suite, scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes_on_memory() {
    let report = run_suite(memory_target(), None).await;
    let (passed, failed, skipped) = report.counts();
    println!("memory: {passed} passed, {failed} failed, {skipped} skipped");
    assert!(report.failures().is_empty(), "{:#?}", report.failures());
    // The in-memory backend claims every capability except a backend-specific illegal key.
    assert_eq!(skipped, 1, "{:#?}", report.results);
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
