//! A long run of the default facade: `EventOrchestrator` on the in-memory store, bounded to
//! `--cap` events (evicting what the outbox relay has published), one publisher and one
//! subscriber. Memory must stop growing once the store is full: the peak resident set after
//! every event is at most [`GROWTH_LIMIT`] times the peak after the first tenth, every event
//! is handled, and the store did evict (its oldest kept event is past position 1).
//!
//! Before the store had a bound it kept every event for the life of the process, and the
//! peak grew with the number of events published.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use orchestrator::EventOrchestrator;
use orchestrator_core::{EventEnvelope, HandlerError, ReadAll};
use orchestrator_store::MemoryLimits;

use crate::slow_handler::status_kib;
use crate::{Failure, Report, Res, ensure};

/// The peak after all events may be at most this many times the peak after the first tenth.
pub(crate) const GROWTH_LIMIT: f64 = 1.5;

/// A ~200-byte JSON payload, different for each event.
fn payload(seq: u64) -> serde_json::Value {
    serde_json::json!({
        "seq": seq,
        "order_id": format!("order-{seq:010}"),
        "customer": "customer-0000000042",
        "amount_cents": 9_999,
        "currency": "EUR",
        "note": "leave at the door, ring twice",
    })
}

pub(crate) async fn run(events: u64, cap: u64) -> Result<(), Failure> {
    Ok(scenario(events, cap).await?)
}

async fn scenario(events: u64, cap: u64) -> Res {
    let orchestrator = EventOrchestrator::builder()
        .memory_limits(
            MemoryLimits::default()
                .when_full(orchestrator_store::WhenFull::EvictReleased)
                .max_events(cap),
        )
        .build()
        .await?;
    let handled = Arc::new(AtomicU64::new(0));
    let counter = handled.clone();
    let _subscription = orchestrator
        .subscribe("soak.#", move |_event: EventEnvelope| {
            counter.fetch_add(1, Ordering::Relaxed);
            async { Ok::<_, HandlerError>(()) }
        })
        .await?;
    let hwm_before = status_kib("VmHWM:").unwrap_or(0);
    eprintln!(
        "soak-memory: {events} events through the default facade, in-memory store capped at \
         {cap} events; VmHWM before {hwm_before} KiB"
    );
    let tenth = (events / 10).max(1);
    let started = Instant::now();
    let mut hwm_tenth = 0;
    for seq in 0..events {
        orchestrator
            .publish(EventEnvelope::new("soak.generated", &payload(seq))?)
            .await?;
        if seq + 1 == tenth {
            hwm_tenth = status_kib("VmHWM:").unwrap_or(0);
            eprintln!("  after {tenth} events: VmHWM {hwm_tenth} KiB");
        }
    }
    let published_in = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while handled.load(Ordering::Relaxed) < events && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    let handled = handled.load(Ordering::Relaxed);
    let hwm = status_kib("VmHWM:").unwrap_or(0);
    let rss = status_kib("VmRSS:").unwrap_or(0);
    let store = orchestrator.store();
    let head = store.head_position().await?;
    let oldest = store
        .read_all(ReadAll::from(1, 1))
        .await?
        .first()
        .and_then(EventEnvelope::global_position)
        .unwrap_or(0);
    let kept = head + 1 - oldest.max(1);
    let growth = hwm as f64 / hwm_tenth.max(1) as f64;
    eprintln!(
        "  {handled} of {events} handled in {took:.1?} (publishing took {published_in:.1?}); \
         store head {head}, oldest kept {oldest} ({kept} kept); VmHWM {hwm} KiB (after the \
         first tenth {hwm_tenth} KiB, ×{growth:.2}), VmRSS {rss} KiB"
    );
    let mut line = Report::new("soak-memory", "in-memory");
    line.add("events", events)
        .add("handled", handled)
        .add("cap", cap)
        .add("kept", kept)
        .add("rss_tenth_kib", hwm_tenth)
        .add("peak_rss_kib", hwm)
        .add("growth", format!("{growth:.2}"))
        .add("growth_limit", GROWTH_LIMIT)
        .add(
            "events_per_s",
            format!("{:.0}", events as f64 / took.as_secs_f64()),
        )
        .add("seconds", format!("{:.1}", took.as_secs_f64()));
    ensure(handled == events, || {
        format!("{handled} of {events} events handled")
    })?;
    ensure(kept <= cap && (events <= cap || oldest > 1), || {
        format!("the store keeps {kept} events (oldest {oldest}), its cap is {cap}")
    })?;
    ensure(hwm > 0 && growth <= GROWTH_LIMIT, || {
        format!(
            "peak RSS {hwm} KiB after {events} events, ×{growth:.2} the {hwm_tenth} KiB after \
             {tenth}: over ×{GROWTH_LIMIT} (or unknown)"
        )
    })?;
    line.print();
    Ok(())
}
