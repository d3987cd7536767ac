//! Where the real brokers are, and what to do when one is unreachable.
//!
//! Backend tests read broker addresses from the environment with loopback defaults. When a
//! broker is unreachable, [`unreachable()`](fn@unreachable) skips the test with a printed reason locally and
//! fails it when `CI=true`, so CI never passes by silently skipping a backend.

/// `ORCHESTRATOR_REDIS_URL`, default `redis://127.0.0.1:6379`.
pub fn redis_url() -> String {
    std::env::var("ORCHESTRATOR_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// `ORCHESTRATOR_AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`.
pub fn amqp_url() -> String {
    std::env::var("ORCHESTRATOR_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// `ORCHESTRATOR_KAFKA_BROKERS`, default `127.0.0.1:9092`.
pub fn kafka_brokers() -> String {
    std::env::var("ORCHESTRATOR_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// `ORCHESTRATOR_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`.
pub fn postgres_url() -> String {
    std::env::var("ORCHESTRATOR_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Whether this run is CI (`CI=true`), where unreachable services fail tests.
pub fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Reports that `service` at `address` is unreachable: panics under CI, otherwise prints
/// why the test is skipped. Call it and return from the test.
pub fn unreachable(service: &str, address: &str, error: &dyn std::fmt::Display) {
    let message = format!(
        "{service} at {address} is unreachable ({error}); start it with `cargo xtask services up`"
    );
    if is_ci() {
        panic!("CI=true: {message}");
    }
    eprintln!("skipping: {message}");
}
