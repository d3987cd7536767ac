//! The metrics orchestrator records, through the [`metrics`] facade.
//!
//! Nothing is collected until you install a recorder — any `metrics` exporter: Prometheus
//! (`metrics-exporter-prometheus`, see `examples/prometheus_metrics.rs`), StatsD, an
//! OpenTelemetry bridge, …. Call [`describe`] once after installing it to give every metric
//! its unit and help text.
//!
//! | area | names | labels |
//! |---|---|---|
//! | bus | [`bus`]: published, delivered, handler errors, retries, dead-lettered, filtered, duplicates, handler duration, in flight | `event_type`, `subscription` |
//! | sagas | [`saga`]: started, completed, compensated, failed, step duration | `saga`, `step`, `phase`, `outcome` |
//! | CQRS | [`cqrs`]: command duration, query duration, cache hits and misses, validation failures, conflicts, … | `command`, `query`, `outcome`, `cache` |
//!
//! No payload data goes into labels.

/// The bus's metric names (`orchestrator_bus_*`).
pub use orchestrator_bus::metrics as bus;
/// The CQRS metric names (`orchestrator_cqrs_*`).
pub use orchestrator_cqrs::telemetry as cqrs;
/// The saga metric names (`orchestrator_saga_*`).
pub use orchestrator_saga::telemetry as saga;

/// Describes every metric of every crate to the installed recorder (units and help texts).
/// Recording works without it; call it once after installing a recorder.
pub fn describe() {
    use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(bus::PUBLISHED, "Events published, by event type.");
    describe_counter!(
        bus::DELIVERED,
        "Handler attempts, by event type and subscription."
    );
    describe_counter!(bus::HANDLER_ERRORS, "Handler attempts that failed.");
    describe_counter!(
        bus::RETRIES,
        "Failed deliveries scheduled for another attempt."
    );
    describe_counter!(
        bus::DEAD_LETTERED,
        "Deliveries parked in the dead-letter queue."
    );
    describe_counter!(
        bus::FILTERED,
        "Deliveries a subscription's filter rejected."
    );
    describe_counter!(
        bus::DUPLICATES,
        "Redeliveries skipped by the idempotent consumer."
    );
    describe_histogram!(
        bus::HANDLER_DURATION,
        Unit::Seconds,
        "Duration of each handler attempt."
    );
    describe_gauge!(bus::IN_FLIGHT, "Handler calls running, by subscription.");
    saga::describe_metrics();
    cqrs::describe_metrics();
}
