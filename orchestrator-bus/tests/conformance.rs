//! The in-process transport against the core Transport conformance suite.

use orchestrator_bus::InProcessTransport;
use orchestrator_core::testkit::transport::run_all;

#[tokio::test]
async fn in_process_transport_passes_the_suite() {
    run_all(|| async { InProcessTransport::new() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_transport_passes_the_suite_on_a_multi_thread_runtime() {
    run_all(|| async { InProcessTransport::new() }).await;
}

/// Queues of one event: every publish beyond the first waits for a consumer, and every
/// re-queue finds the queue full.
#[tokio::test]
async fn in_process_transport_passes_the_suite_with_tiny_queues() {
    run_all(|| async { InProcessTransport::with_capacity(1) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_conformance_cases_pass_in_process() {
    orchestrator_bus::testkit::run_all(std::sync::Arc::new(InProcessTransport::new())).await;
}
