//! A fast publisher and a deliberately slow handler on the in-process bus: the publisher
//! must be held back by the bounded queue, so memory stays flat however many events go
//! through, and every event is handled.
//!
//! The handler sleeps 1 ms every 100 events — about 10× slower than the publisher, like
//! a handler that waits on a database now and then. With an unbounded queue the backlog
//! (hundreds of thousands of envelopes of a few hundred bytes) would take hundreds of
//! megabytes; the bound checked here is [`PEAK_RSS_LIMIT_KIB`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use orchestrator_bus::{EventBus, InProcessTransport, SubscriptionConfig};
use orchestrator_core::{EventEnvelope, HandlerError};

use crate::{Failure, Report, Res, ensure};

/// The most the whole process may hold at its peak (VmHWM), in KiB: 64 MiB.
pub(crate) const PEAK_RSS_LIMIT_KIB: u64 = 64 * 1024;
/// The handler sleeps this long …
const PAUSE: Duration = Duration::from_millis(1);
/// … every this many events.
const EVENTS_PER_PAUSE: u64 = 100;

/// A field of `/proc/self/status` (`VmHWM`, `VmRSS`), in KiB.
pub(crate) fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A ~200-byte JSON payload, different for each event.
fn payload(seq: usize) -> serde_json::Value {
    serde_json::json!({
        "seq": seq,
        "order_id": format!("order-{seq:010}"),
        "customer": "customer-0000000042",
        "amount_cents": 9_999,
        "currency": "EUR",
        "lines": [{"sku": "SKU-1", "qty": 1}, {"sku": "SKU-2", "qty": 3}],
        "note": "leave at the door, ring twice",
    })
}

pub(crate) async fn run(events: usize) -> Result<(), Failure> {
    Ok(scenario(events).await?)
}

async fn scenario(events: usize) -> Res {
    let transport = Arc::new(InProcessTransport::new());
    let capacity = transport.capacity();
    let bus = EventBus::new(transport.clone());
    let handled = Arc::new(AtomicU64::new(0));
    let counter = handled.clone();
    let _subscription = bus
        .subscribe_with(
            SubscriptionConfig::new("load.#").named("slow"),
            Arc::new(move |_event: EventEnvelope| {
                let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
                async move {
                    if n.is_multiple_of(EVENTS_PER_PAUSE) {
                        tokio::time::sleep(PAUSE).await;
                    }
                    Ok::<_, HandlerError>(())
                }
            }),
        )
        .await?;
    let hwm_before = status_kib("VmHWM:").unwrap_or(0);
    eprintln!(
        "slow-handler: {events} events, queue capacity {capacity}, handler pauses {PAUSE:?} \
         every {EVENTS_PER_PAUSE} events; VmHWM before {hwm_before} KiB"
    );

    // Samples the backlog and the resident set while the run lasts.
    let done = Arc::new(AtomicBool::new(false));
    let max_queued = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (done, max_queued, transport) = (done.clone(), max_queued.clone(), transport.clone());
        tokio::spawn(async move {
            let mut max_rss = 0;
            while !done.load(Ordering::Relaxed) {
                if let Some(queued) = transport.queued("slow") {
                    max_queued.fetch_max(queued, Ordering::Relaxed);
                }
                max_rss = max_rss.max(status_kib("VmRSS:").unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            max_rss
        })
    };

    let started = Instant::now();
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            for seq in 0..events {
                bus.publish(EventEnvelope::new("load.generated", &payload(seq))?)
                    .await?;
            }
            Ok::<_, orchestrator_core::Error>(started.elapsed())
        })
    };
    let published_in = publisher.await??;
    let deadline = Instant::now() + Duration::from_secs(120);
    while handled.load(Ordering::Relaxed) < events as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let max_rss = sampler.await?;
    let hwm = status_kib("VmHWM:").unwrap_or(0);
    let handled = handled.load(Ordering::Relaxed);
    let max_queued = max_queued.load(Ordering::Relaxed);
    eprintln!(
        "  {handled} of {events} handled in {took:.1?} ({:.0} events/s; publishing took \
         {published_in:.1?}); backlog at most {max_queued} (capacity {capacity}); peak RSS \
         (VmHWM) {hwm} KiB, before the run {hwm_before} KiB, largest VmRSS sampled {max_rss} KiB",
        handled as f64 / took.as_secs_f64()
    );
    let mut line = Report::new("slow-handler", "in-process bus");
    line.add("events", events)
        .add("handled", handled)
        .add("lost", events as u64 - handled.min(events as u64))
        .add("max_backlog", max_queued)
        .add("queue_capacity", capacity)
        .add("peak_rss_kib", hwm)
        .add("rss_before_kib", hwm_before)
        .add("rss_limit_kib", PEAK_RSS_LIMIT_KIB)
        .add(
            "events_per_s",
            format!("{:.0}", handled as f64 / took.as_secs_f64()),
        )
        .add("seconds", format!("{:.1}", took.as_secs_f64()));
    ensure(handled == events as u64, || {
        format!("{handled} of {events} events handled")
    })?;
    ensure(max_queued <= capacity, || {
        format!("the backlog reached {max_queued}, over the queue's capacity {capacity}")
    })?;
    ensure(hwm > 0 && hwm <= PEAK_RSS_LIMIT_KIB, || {
        format!("peak RSS {hwm} KiB, over the {PEAK_RSS_LIMIT_KIB} KiB bound (or unknown)")
    })?;
    line.print();
    Ok(())
}
