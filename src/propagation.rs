//! What travels with an event from its publisher to its handlers: the W3C trace context and
//! the causation chain.
//!
//! The facade's [`publish`](crate::EventOrchestrator::publish) runs in a span
//! `orchestrator.publish`; when that span is recorded by an OpenTelemetry layer
//! ([`tracing_opentelemetry`]), its context is written into the envelope as a W3C
//! `traceparent` / `tracestate` with the `opentelemetry` [`TraceContextPropagator`] —
//! the envelope's [`TraceContext`], which every backend carries (a CloudEvents extension,
//! and a broker header where the broker has headers). On delivery, the
//! [`TracePropagation`] middleware, which the facade installs on every subscription, reads
//! it back with the same propagator and makes the handler's span `orchestrator.handle` a
//! child of the publish span. So one trace runs from the publish, through any broker, into
//! the handler and on into whatever the handler does under its span: sagas it starts
//! (`saga`, `saga.step`), commands it sends (`cqrs.command`), events it publishes.
//!
//! Events published from inside a handler also get the handled event as their cause
//! ([`EventEnvelope::caused_by`]: same correlation id, causation id = the handled event's
//! id) unless they name a correlation or causation id themselves, so the causation tree of
//! a request can be rebuilt from the store (the CLI's `trace` command does).
//!
//! Without an OpenTelemetry layer nothing is injected and extraction costs nothing: spans
//! that no subscriber records are skipped.
//!
//! The bus opens its own span `bus.handle` around each delivery before any middleware runs,
//! so it cannot take the publisher's context: with an OpenTelemetry layer it is the root of a
//! one-span trace of its own. `orchestrator.handle`, inside it, is the span that joins the
//! publisher's trace. Leave `bus.handle` out of the OpenTelemetry layer with a per-layer
//! filter if those one-span traces are noise.
//!
//! ```
//! use orchestrator::propagation;
//! use orchestrator_core::{EventEnvelope, TraceContext};
//!
//! let event = EventEnvelope::new("order.placed", &serde_json::json!({}))?.with_trace_context(
//!     TraceContext {
//!         traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
//!         tracestate: None,
//!     },
//! );
//! let parent = propagation::extract(&event).expect("a valid traceparent");
//! use orchestrator::opentelemetry::trace::TraceContextExt as _;
//! assert_eq!(
//!     parent.span().span_context().trace_id().to_string(),
//!     "0af7651916cd43dd8448eb211c80319c"
//! );
//! # Ok::<(), orchestrator_core::Error>(())
//! ```

use async_trait::async_trait;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use orchestrator_bus::middleware::{DeliveryContext, Middleware, Next};
use orchestrator_core::{EventEnvelope, HandlerError, TraceContext};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

tokio::task_local! {
    static HANDLING: EventEnvelope;
}

/// The event whose handler is running on the calling task, when that handler was
/// subscribed through the facade (or with the [`TracePropagation`] middleware).
///
/// Tasks the handler spawns do not inherit it.
pub fn current_event() -> Option<EventEnvelope> {
    HANDLING.try_with(EventEnvelope::clone).ok()
}

/// The W3C trace context of `span`, if an OpenTelemetry layer records it.
pub fn trace_context_of(span: &tracing::Span) -> Option<TraceContext> {
    if span.is_disabled() {
        return None;
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = Carrier::default();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    Some(TraceContext {
        traceparent: carrier.traceparent?,
        tracestate: carrier.tracestate.filter(|s| !s.is_empty()),
    })
}

/// Writes the trace context of `span` into `event` (leaving the event's own trace context,
/// if any, when `span` is not recorded by an OpenTelemetry layer).
pub fn inject(event: EventEnvelope, span: &tracing::Span) -> EventEnvelope {
    match trace_context_of(span) {
        Some(trace) => event.with_trace_context(trace),
        None => event,
    }
}

/// The OpenTelemetry context `event` was published in, read from its `traceparent` and
/// `tracestate`; `None` when it carries none, or none that is valid.
pub fn extract(event: &EventEnvelope) -> Option<opentelemetry::Context> {
    let trace = event.trace_context()?;
    let context = TraceContextPropagator::new().extract(&ExtractFrom(trace));
    context.span().span_context().is_valid().then_some(context)
}

/// Marks `event` as caused by the event being handled on this task (see
/// [`current_event`]), unless it names a correlation or causation id of its own.
pub(crate) fn with_cause(event: EventEnvelope) -> EventEnvelope {
    if event.correlation_id().is_some() || event.causation_id().is_some() {
        return event;
    }
    match HANDLING.try_with(|cause| event.clone().caused_by(cause)) {
        Ok(caused) => caused,
        Err(_) => event,
    }
}

/// The delivery side of propagation, installed by the facade on every subscription: runs
/// the rest of the chain and the handler in a span `orchestrator.handle` (fields
/// `subscription`, `event_type`, `event_id`, `attempt`; OpenTelemetry kind `consumer`)
/// whose parent is the context extracted from the event's `traceparent`, and makes the
/// event the cause of what the handler publishes (see the [module docs](self)).
///
/// Install it yourself on subscriptions made on an [`EventBus`](orchestrator_bus::EventBus)
/// directly:
///
/// ```
/// use orchestrator::propagation::TracePropagation;
/// use orchestrator_bus::SubscriptionConfig;
///
/// let config = SubscriptionConfig::new("order.#").middleware(TracePropagation);
/// # let _ = config;
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct TracePropagation;

#[async_trait]
impl Middleware for TracePropagation {
    async fn handle(
        &self,
        event: EventEnvelope,
        ctx: &DeliveryContext,
        next: Next<'_>,
    ) -> Result<(), HandlerError> {
        let span = tracing::info_span!(
            "orchestrator.handle",
            otel.kind = "consumer",
            subscription = %ctx.subscription,
            event_type = %event.event_type(),
            event_id = %event.id(),
            attempt = ctx.attempt,
        );
        if !span.is_disabled()
            && let Some(parent) = extract(&event)
        {
            // Fails only without an OpenTelemetry layer, where there is no parent to set.
            let _ = span.set_parent(parent);
        }
        let cause = event.clone();
        HANDLING
            .scope(cause, next.run(event, ctx).instrument(span))
            .await
    }
}

/// Collects what the propagator injects.
#[derive(Default)]
struct Carrier {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        match key {
            TRACEPARENT => self.traceparent = Some(value),
            TRACESTATE => self.tracestate = Some(value),
            _ => {}
        }
    }
}

/// Lets the propagator read an envelope's trace context.
struct ExtractFrom<'a>(&'a TraceContext);

impl Extractor for ExtractFrom<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => Some(&self.0.traceparent),
            TRACESTATE => self.0.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        let mut keys = vec![TRACEPARENT];
        if self.0.tracestate.is_some() {
            keys.push(TRACESTATE);
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn invalid_or_missing_trace_context_extracts_nothing() {
        let event = EventEnvelope::new("a.b", &json!({})).unwrap();
        assert!(extract(&event).is_none());
        let event = event.with_trace_context(TraceContext {
            traceparent: "garbage".into(),
            tracestate: None,
        });
        assert!(extract(&event).is_none());
    }

    #[test]
    fn nothing_is_injected_without_an_opentelemetry_layer() {
        let event = EventEnvelope::new("a.b", &json!({})).unwrap();
        let span = tracing::info_span!("x");
        assert!(inject(event, &span).trace_context().is_none());
    }

    #[tokio::test]
    async fn events_published_while_handling_are_caused_by_the_handled_one() {
        let cause = EventEnvelope::new("order.placed", &json!({}))
            .unwrap()
            .with_correlation_id("req-1");
        let cause_id = cause.id().to_string();
        let (effect, own) = HANDLING
            .scope(cause, async {
                let effect = with_cause(EventEnvelope::new("order.paid", &json!({})).unwrap());
                let own = with_cause(
                    EventEnvelope::new("order.paid", &json!({}))
                        .unwrap()
                        .with_correlation_id("mine"),
                );
                (effect, own)
            })
            .await;
        assert_eq!(effect.correlation_id(), Some("req-1"));
        assert_eq!(effect.causation_id(), Some(cause_id.as_str()));
        assert_eq!(own.correlation_id(), Some("mine"));
        assert_eq!(own.causation_id(), None);
        assert!(current_event().is_none());
    }
}
