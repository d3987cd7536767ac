//! How a subscription behaves: its patterns, filter, transform, concurrency, ordering,
//! middleware, retry policy and deduplication.

use std::sync::Arc;

use orchestrator_core::{
    EventEnvelope, HandlerError, InMemoryInbox, Inbox, InboxRetention, RetryPolicy,
};

use crate::middleware::Middleware;

/// A predicate on the envelope: events it rejects are acknowledged without reaching the
/// handler (and counted in `orchestrator_bus_filtered_total`).
pub type Filter = Arc<dyn Fn(&EventEnvelope) -> bool + Send + Sync>;

/// Maps the envelope before the handler sees it (enrich, upcast, redact). An error is a
/// handler failure: retried if retryable, else dead-lettered.
pub type Transform =
    Arc<dyn Fn(EventEnvelope) -> Result<EventEnvelope, HandlerError> + Send + Sync>;

/// Where a failed event waits for its next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryMode {
    /// The bus waits out the backoff and calls the handler again, holding the delivery:
    /// later events of the same key wait, so per-key order holds even across failures.
    /// The default for subscriptions ordered by key.
    InPlace,
    /// The delivery is nacked with the backoff as its delay and the transport redelivers
    /// it: the consumer moves on meanwhile, and a retry survives a crash of this process on
    /// durable transports. The default for unordered subscriptions.
    Redeliver,
}

/// The options of one subscription. Built with [`SubscriptionConfig::new`] and the
/// chainable setters, then passed to [`EventBus::subscribe_with`](crate::EventBus::subscribe_with).
///
/// ```
/// use std::time::Duration;
/// use orchestrator_bus::{SubscriptionConfig, middleware::LogEvents};
/// use orchestrator_core::RetryPolicy;
///
/// let config = SubscriptionConfig::new("order.#")
///     .named("billing")
///     .filter(|e| e.header("tenant") == Some("acme"))
///     .concurrency(8)
///     .ordered_by_key()
///     .middleware(LogEvents)
///     .retry(RetryPolicy::exponential(5, Duration::from_millis(50)))
///     .idempotent(10_000);
/// # let _ = config;
/// ```
#[derive(Clone)]
pub struct SubscriptionConfig {
    pub(crate) name: Option<String>,
    pub(crate) patterns: Vec<String>,
    pub(crate) filter: Option<Filter>,
    pub(crate) transform: Option<Transform>,
    pub(crate) concurrency: usize,
    pub(crate) ordered: bool,
    pub(crate) middleware: Vec<Arc<dyn Middleware>>,
    pub(crate) retry: Option<RetryPolicy>,
    pub(crate) retry_mode: Option<RetryMode>,
    pub(crate) inbox: Option<Arc<dyn Inbox>>,
    pub(crate) ephemeral: bool,
}

impl std::fmt::Debug for SubscriptionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionConfig")
            .field("name", &self.name)
            .field("patterns", &self.patterns)
            .field("filter", &self.filter.is_some())
            .field("transform", &self.transform.is_some())
            .field("concurrency", &self.concurrency)
            .field("ordered", &self.ordered)
            .field("middleware", &self.middleware.len())
            .field("retry", &self.retry)
            .field("retry_mode", &self.retry_mode)
            .field("inbox", &self.inbox.as_ref().map(|inbox| inbox.describe()))
            .field("ephemeral", &self.ephemeral)
            .finish()
    }
}

impl SubscriptionConfig {
    /// A subscription to `pattern` (`"user.created"`, `"user.*"`, `"order.#"`): one event
    /// at a time, the bus's retry policy, no filter, transform or middleware.
    pub fn new(pattern: impl Into<String>) -> Self {
        Self {
            name: None,
            patterns: vec![pattern.into()],
            filter: None,
            transform: None,
            concurrency: 1,
            ordered: false,
            middleware: Vec::new(),
            retry: None,
            retry_mode: None,
            inbox: None,
            ephemeral: false,
        }
    }

    /// Names the subscription. The name is its consumer group: subscriptions with the same
    /// name share the events (competing consumers), each event going to one of them; dead
    /// letters record it and reprocessing goes back to it. Unnamed subscriptions get a
    /// unique name, so each sees every event, and are [ephemeral](Self::ephemeral).
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Makes the subscription ephemeral: it sees the events published while it is
    /// subscribed, and the transport removes its consumer group when it stops (a broker
    /// cleans up after a crashed process too: see
    /// [`SubscribeOptions::ephemeral`](orchestrator_core::SubscribeOptions::ephemeral)). For
    /// tails, tests and other short-lived consumers. Unnamed subscriptions are always
    /// ephemeral (their random group could never be resumed); a named ephemeral one must
    /// have a name no other consumer uses.
    pub fn ephemeral(mut self) -> Self {
        self.ephemeral = true;
        self
    }

    /// Whether the subscription was made [`ephemeral`](Self::ephemeral) (an unnamed one is
    /// made so when it subscribes).
    pub fn is_ephemeral(&self) -> bool {
        self.ephemeral
    }

    /// The name given with [`named`](Self::named), if any.
    pub fn given_name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The topic patterns, in the order given.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// Adds another pattern.
    pub fn pattern(mut self, pattern: impl Into<String>) -> Self {
        self.patterns.push(pattern.into());
        self
    }

    /// Only events for which `filter` returns true reach the handler; it runs before the
    /// transform.
    pub fn filter(
        mut self,
        filter: impl Fn(&EventEnvelope) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.filter = Some(Arc::new(filter));
        self
    }

    /// Maps each event (after the filter) before the middleware and handler see it.
    pub fn transform(
        mut self,
        transform: impl Fn(EventEnvelope) -> Result<EventEnvelope, HandlerError> + Send + Sync + 'static,
    ) -> Self {
        self.transform = Some(Arc::new(transform));
        self
    }

    /// Handles up to `limit` events at once (at least 1; default 1).
    pub fn concurrency(mut self, limit: usize) -> Self {
        self.concurrency = limit.max(1);
        self
    }

    /// Keeps per-key order: events with the same [partition key](EventEnvelope::partition_key)
    /// (the stream id) are handled one after another, in delivery order, even with
    /// concurrency above 1. Retries default to [`RetryMode::InPlace`] so failures keep the
    /// order too.
    pub fn ordered_by_key(mut self) -> Self {
        self.ordered = true;
        self
    }

    /// Appends a middleware; the first added is the outermost.
    pub fn middleware(mut self, middleware: impl Middleware) -> Self {
        self.middleware.push(Arc::new(middleware));
        self
    }

    /// Appends a shared middleware.
    pub fn middleware_arc(mut self, middleware: Arc<dyn Middleware>) -> Self {
        self.middleware.push(middleware);
        self
    }

    /// This subscription's retry policy (default: the bus's).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Where failed events wait for their retry (default: in place when ordered by key,
    /// else redelivered by the transport).
    pub fn retry_mode(mut self, mode: RetryMode) -> Self {
        self.retry_mode = Some(mode);
        self
    }

    /// The idempotent consumer in memory: skip events whose id was handled successfully
    /// within the last `window` events, so a redelivery does not repeat side effects. It
    /// forgets on restart; [`inbox`](Self::inbox) with a durable inbox does not. Shorthand
    /// for `.inbox(Arc::new(InMemoryInbox::new(InboxRetention::last(window))))`.
    pub fn idempotent(self, window: usize) -> Self {
        self.inbox(Arc::new(InMemoryInbox::new(InboxRetention::last(window))))
    }

    /// The idempotent consumer on `inbox`: a delivery whose event id the inbox has seen for
    /// this subscription's name (its consumer group) is acknowledged without calling the
    /// handler (and counted in `orchestrator_bus_duplicates_total`); after the handler
    /// succeeds, the id is recorded, then the delivery is acknowledged. A failed handler's
    /// id is not recorded, so its retry runs. Replaces an earlier
    /// [`idempotent`](Self::idempotent).
    ///
    /// With a durable inbox (a file or Redis one: `EventOrchestrator::inbox()` in the
    /// facade) the de-duplication survives restarts — [name](Self::named) the subscription,
    /// since its name is the key the ids are kept under. See
    /// [`orchestrator_core::inbox`] for what is guaranteed: a crash between the handler's
    /// success and the record means one more handling.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use orchestrator_bus::SubscriptionConfig;
    /// use orchestrator_core::inbox::{InMemoryInbox, InboxRetention};
    ///
    /// let inbox = Arc::new(InMemoryInbox::new(InboxRetention::last(50_000)));
    /// let config = SubscriptionConfig::new("order.#").named("billing").inbox(inbox);
    /// # let _ = config;
    /// ```
    pub fn inbox(mut self, inbox: Arc<dyn Inbox>) -> Self {
        self.inbox = Some(inbox);
        self
    }
}
