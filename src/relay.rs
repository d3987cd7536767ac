//! The outbox relay: the event store is the one commit point, and the relay carries what it
//! holds to the transport.
//!
//! [`EventOrchestrator::publish`](crate::EventOrchestrator::publish) only appends: once the
//! append returns, the event is committed and will be delivered, whatever happens next (a
//! crash, a `kill -9`, a broker outage). The relay follows the store's global log from a
//! durable checkpoint, publishes each event on the transport in log order, and moves the
//! checkpoint forward only after the transport has confirmed what came before it. After a
//! restart it resumes from the checkpoint, so every stored event is published at least once
//! (events published between the last checkpoint and a crash are published again: turn on
//! de-duplication in subscriptions that must not see them twice).
//!
//! - **What it publishes.** Every event of the store's log except the library's own
//!   bookkeeping: system streams (`$…`: checkpoints) and saga logs (`saga-…`). So events that
//!   aggregates append straight to the store are delivered too.
//! - **One relay per store.** Processes sharing a store elect one relay through the store's
//!   [`Lease`] ([`EventStore::lease`]): a local lease on the in-memory store and on the file
//!   store (one process at a time opens its directory), a Redis key with a 5 s time to live
//!   on the Redis store, an exclusive queue (held by its connection) on the RabbitMQ store,
//!   the assignment of a consumer group's one partition on the Kafka store (6 s session
//!   timeout; on tansu 0.6.0, whose coordinator keeps a dead member, a standby takes over
//!   after three session timeouts without a renewal, see the Kafka backend's docs). A standby keeps trying and takes over when the holder stops
//!   renewing.
//! - **Checkpoint.** Kept in the store itself, in the system stream
//!   `$checkpoint-relay.<name>`, every [`RelayOptions::checkpoint_every`] published events or
//!   at the latest [`RelayOptions::checkpoint_interval`] after the first event it has not
//!   checkpointed, whichever comes first, and when the relay stops. Where the store checks exact versions, a relay that lost its lease
//!   and writes a checkpoint late finds the stream moved on, and stops. The in-memory store
//!   gets no checkpoint (nothing outlives the process anyway).
//! - **Failures.** A publish that fails is retried with backoff (50 ms up to 5 s), for as
//!   long as it takes: a broker outage delays delivery, and loses nothing. An event the
//!   transport can never take (its type is not a valid topic, it fails its schema) is put in
//!   the transport's dead-letter queue with the subscription name `relay:<name>`, so that it
//!   is not silently dropped and the relay goes on. So is a record of the store's log that
//!   cannot be read as an event at all (a row written by hand, an event no upcaster can
//!   read): reading it again would fail again, so the relay dead-letters an
//!   [`UNDECODABLE_EVENT_TYPE`] event naming the store, the position after which it lies and
//!   the decode error, and goes on with the events after it.
//! - **Latency.** The relay is woken by the store's own live subscription (at once for the
//!   in-memory and file stores) and publishes runs of events of one type with one
//!   [`EventBus::publish_batch`] call.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::{FutureExt as _, StreamExt as _};
use orchestrator_bus::{EventBus, InProcessTransport};
use orchestrator_core::dlq::UNDECODABLE_EVENT_TYPE;
use orchestrator_core::{DeadLetter, Error, EventEnvelope, EventFilter, EventStore, Lease};
use orchestrator_store::projection::Checkpoints;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How the outbox relay runs; see the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayOptions {
    /// The relay's name: its checkpoint stream is `$checkpoint-relay.<name>` and its lease
    /// `relay.<name>`. Default `default`.
    pub name: String,
    /// Whether this process relays at all (default `true`).
    pub enabled: bool,
    /// At most this many events are read from the store per step (default 512).
    pub batch: usize,
    /// Checkpoint after this many published events (default 1,000).
    pub checkpoint_every: u64,
    /// Checkpoint at the latest this long after the first published event not checkpointed
    /// yet (default 1 s).
    pub checkpoint_interval: Duration,
    /// Streams whose id starts with one of these are not published (default `$` and `saga-`).
    pub skip_stream_prefixes: Vec<String>,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            name: "default".to_owned(),
            enabled: true,
            batch: 512,
            checkpoint_every: 1_000,
            checkpoint_interval: Duration::from_secs(1),
            skip_stream_prefixes: vec!["$".to_owned(), "saga-".to_owned()],
        }
    }
}

impl RelayOptions {
    /// No relay in this process: its publishes are stored and another process (one that
    /// relays the same store) delivers them.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// Names the relay (its checkpoint and lease).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Checkpoint after `events` published events (at least 1).
    pub fn checkpoint_every(mut self, events: u64) -> Self {
        self.checkpoint_every = events.max(1);
        self
    }

    /// Checkpoint at the latest `interval` after the first published event not checkpointed
    /// yet.
    pub fn checkpoint_interval(mut self, interval: Duration) -> Self {
        self.checkpoint_interval = interval;
        self
    }

    /// Read at most `events` per step (at least 1).
    pub fn batch(mut self, events: usize) -> Self {
        self.batch = events.max(1);
        self
    }

    /// Whether the relay publishes events of `stream`.
    pub fn publishes_stream(&self, stream: Option<&str>) -> bool {
        stream.is_none_or(|s| !self.skip_stream_prefixes.iter().any(|p| s.starts_with(p)))
    }
}

/// What the relay is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayState {
    /// Not started yet (it starts with the first publish, or when the orchestrator is built
    /// on a durable store).
    Idle,
    /// Waiting for the lease that another process holds.
    Standby,
    /// Holding the lease and publishing.
    Relaying,
    /// Failed and about to retry: the reason.
    Retrying(String),
    /// Stopped for good (shut down, or disabled).
    Stopped,
}

/// A snapshot of the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStatus {
    /// What it is doing.
    pub state: RelayState,
    /// Every event up to this global position has been published (or skipped, or
    /// dead-lettered) by this process's relay.
    pub relayed_position: u64,
    /// The last checkpoint this relay wrote or loaded.
    pub checkpoint: u64,
    /// Events this relay put in the dead-letter queue because the transport refused them.
    pub dead_lettered: u64,
    /// Where its lease is kept (`None`: the store has none, the relay runs unleased).
    pub lease: Option<String>,
}

/// The relay of one orchestrator: started once, stopped by [`Relay::stop`] or when the last
/// orchestrator clone is dropped.
pub(crate) struct Relay {
    options: RelayOptions,
    store: Arc<dyn EventStore>,
    bus: EventBus,
    status: watch::Sender<RelayStatus>,
    /// `true` asks the task to stop; dropping it (with the last orchestrator) stops it too.
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
    /// The store's lease for this relay, unless it is local (always held).
    lease: Option<Arc<dyn Lease>>,
    /// Whether the task was started (a lock-free look before taking `task`'s lock).
    started: AtomicBool,
    /// Where the relay is, for publishers to pace themselves (see [`Pace`]).
    pace: Arc<Pace>,
    /// Publishers giving way to the relay (see [`Relay::give_way`]).
    giving_way: AtomicU64,
    /// Told every position up to which events are relayed (the bounded in-memory store
    /// evicts only those).
    on_relayed: Option<OnRelayed>,
}

/// A publisher giving way to the relay, counted until dropped (see [`Relay::give_way`]).
pub(crate) struct GivingWay<'a>(&'a AtomicU64);

impl Drop for GivingWay<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How far this process's relay has published, for [`Relay::behind`]: the relayed position
/// while the relay is relaying here, [`Pace::NOT_RELAYING`] otherwise (stopped, standing by
/// for another process's relay, or retrying a transport that is down: publishers then have
/// nothing to give way to).
#[derive(Debug)]
struct Pace(AtomicU64);

impl Pace {
    const NOT_RELAYING: u64 = u64::MAX;

    fn relaying_at(&self, position: u64) {
        self.0.store(position, Ordering::Relaxed);
    }

    fn not_relaying(&self) {
        self.0.store(Self::NOT_RELAYING, Ordering::Relaxed);
    }
}

/// What a relay tells, as it moves, the position up to which it has relayed.
pub(crate) type OnRelayed = Arc<dyn Fn(u64) + Send + Sync>;

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("options", &self.options)
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl Relay {
    pub(crate) fn new(options: RelayOptions, store: Arc<dyn EventStore>, bus: EventBus) -> Self {
        let lease = store.lease(&format!("relay.{}", options.name));
        let state = if options.enabled {
            RelayState::Idle
        } else {
            RelayState::Stopped
        };
        Self {
            options,
            store,
            bus,
            status: watch::Sender::new(RelayStatus {
                state,
                relayed_position: 0,
                checkpoint: 0,
                dead_lettered: 0,
                lease: lease.as_ref().map(|l| l.describe()),
            }),
            stop: watch::Sender::new(false),
            task: Mutex::new(None),
            // A local lease is always held: nothing to take or renew.
            lease: lease.filter(|lease| !lease.is_local()),
            started: AtomicBool::new(false),
            pace: Arc::new(Pace(AtomicU64::new(Pace::NOT_RELAYING))),
            giving_way: AtomicU64::new(0),
            on_relayed: None,
        }
    }

    /// Counts a publisher giving way to the relay until the guard is dropped, for the others
    /// to pace themselves by how many do.
    pub(crate) fn give_way(&self) -> GivingWay<'_> {
        self.giving_way.fetch_add(1, Ordering::Relaxed);
        GivingWay(&self.giving_way)
    }

    /// How many publishers are giving way to the relay now.
    pub(crate) fn giving_way(&self) -> u64 {
        self.giving_way.load(Ordering::Relaxed)
    }

    /// How many events up to `position` this process's relay has still to publish; 0 when
    /// it is not relaying here (see [`Pace`]).
    pub(crate) fn behind(&self, position: u64) -> u64 {
        position.saturating_sub(self.pace.0.load(Ordering::Relaxed))
    }

    /// Calls `hook` with the relayed position each time it moves.
    pub(crate) fn on_relayed(mut self, hook: OnRelayed) -> Self {
        self.on_relayed = Some(hook);
        self
    }

    /// Whether the relay was asked to stop (the orchestrator shuts down).
    pub(crate) fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    pub(crate) fn options(&self) -> &RelayOptions {
        &self.options
    }

    /// Starts the relay task unless it runs already (or is disabled, or stopped).
    pub(crate) fn ensure_started(&self) {
        // Called on every publish: once started, no lock.
        if self.started.load(Ordering::Acquire) || !self.options.enabled || *self.stop.borrow() {
            return;
        }
        let mut task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if task.is_some() {
            return;
        }
        let worker = Worker {
            options: self.options.clone(),
            store: Arc::clone(&self.store),
            bus: self.bus.clone(),
            status: self.status.clone(),
            on_relayed: self.on_relayed.clone(),
            stop: self.stop.subscribe(),
            lease: self.lease.clone(),
            pace: Arc::clone(&self.pace),
            in_process: self
                .bus
                .transport()
                .as_any()
                .and_then(|t| t.downcast_ref::<InProcessTransport>())
                .cloned(),
        };
        *task = Some(tokio::spawn(worker.run()));
        self.started.store(true, Ordering::Release);
    }

    pub(crate) fn status(&self) -> RelayStatus {
        self.status.borrow().clone()
    }

    /// Waits until the relay has published everything up to `position`. Fails when the relay
    /// is disabled or stopped before it got there.
    pub(crate) async fn wait_for(&self, position: u64) -> orchestrator_core::Result<()> {
        self.ensure_started();
        let mut status = self.status.subscribe();
        loop {
            {
                let now = status.borrow_and_update();
                if now.relayed_position >= position {
                    return Ok(());
                }
                if now.state == RelayState::Stopped {
                    return Err(Error::Closed {
                        what: format!(
                            "outbox relay `{}` (it stopped at position {}, before {position}{})",
                            self.options.name,
                            now.relayed_position,
                            if self.options.enabled {
                                ""
                            } else {
                                ": it is disabled in this process"
                            }
                        ),
                    });
                }
            }
            if status.changed().await.is_err() {
                return Err(Error::Closed {
                    what: format!("outbox relay `{}`", self.options.name),
                });
            }
        }
    }

    /// Publishes what is stored up to the store's head as it stands now, waiting at most
    /// `deadline`, then stops the relay (writing its checkpoint). Returns whether it caught up
    /// (a standby, which another process's relay covers, has nothing to catch up).
    pub(crate) async fn drain_and_stop(&self, deadline: Duration) -> bool {
        // A standby publishes nothing: the holder of the lease relays what is stored.
        let standby = self.status.borrow().state == RelayState::Standby;
        let caught_up = match self.store.head_position().await {
            Ok(head) if self.task_running() && !standby => {
                tokio::time::timeout(deadline, self.wait_for(head))
                    .await
                    .is_ok_and(|r| r.is_ok())
            }
            // Nothing of this process's to drain.
            _ => standby,
        };
        self.stop.send_replace(true);
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task
            && tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
        {
            tracing::warn!(relay = %self.options.name, "the outbox relay did not stop within 5 s");
        }
        self.status.send_modify(|s| s.state = RelayState::Stopped);
        caught_up
    }

    fn task_running(&self) -> bool {
        self.task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Why one spell of relaying ended.
enum Ended {
    /// Asked to stop (or the orchestrator is gone).
    Stop,
    /// The lease was lost (or could not be renewed for its whole time to live).
    LeaseLost,
    /// Something failed; retry after a pause.
    Failed(Error),
}

struct Worker {
    options: RelayOptions,
    store: Arc<dyn EventStore>,
    bus: EventBus,
    status: watch::Sender<RelayStatus>,
    stop: watch::Receiver<bool>,
    lease: Option<Arc<dyn Lease>>,
    pace: Arc<Pace>,
    /// The transport, when it is the in-process one (checkpoints wait for it to settle).
    in_process: Option<InProcessTransport>,
    on_relayed: Option<OnRelayed>,
}

impl Worker {
    async fn run(mut self) {
        let mut failures = 0u32;
        loop {
            if self.stopping() {
                break;
            }
            let held = match self.lease.clone() {
                None => None,
                Some(lease) => match self.acquire(&lease).await {
                    Some(held) => Some(held),
                    None => break,
                },
            };
            self.status.send_modify(|s| s.state = RelayState::Relaying);
            let ended = self.relay(held.as_ref().map(|h| &h.held)).await;
            self.pace.not_relaying();
            if let Some(held) = held {
                held.keeper.abort();
                if matches!(ended, Ended::Stop)
                    && let Some(lease) = &self.lease
                    && let Err(e) = lease.release().await
                {
                    tracing::debug!(relay = %self.options.name, error = %e, "releasing the relay lease failed");
                }
            }
            match ended {
                Ended::Stop => break,
                Ended::LeaseLost => {
                    tracing::warn!(relay = %self.options.name, "the outbox relay lost its lease; standing by");
                    failures = 0;
                }
                Ended::Failed(error) => {
                    failures = failures.saturating_add(1);
                    let pause = backoff(failures);
                    tracing::warn!(relay = %self.options.name, %error, ?pause, "the outbox relay failed; retrying");
                    self.status
                        .send_modify(|s| s.state = RelayState::Retrying(error.to_string()));
                    if self.pause(pause).await {
                        break;
                    }
                }
            }
        }
        self.status.send_modify(|s| s.state = RelayState::Stopped);
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow() || self.stop.has_changed().is_err()
    }

    /// Sleeps `pause`; `true` when asked to stop meanwhile.
    async fn pause(&mut self, pause: Duration) -> bool {
        let mut stop = self.stop.clone();
        tokio::select! {
            () = tokio::time::sleep(pause) => self.stopping(),
            () = stopped(&mut stop) => true,
        }
    }

    /// Waits for the lease; `None` when asked to stop first.
    async fn acquire(&mut self, lease: &Arc<dyn Lease>) -> Option<Held> {
        let every = lease.ttl() / 3;
        loop {
            match lease.try_acquire().await {
                Ok(true) => return Some(Held::keep(Arc::clone(lease))),
                Ok(false) => self.status.send_modify(|s| s.state = RelayState::Standby),
                Err(e) => {
                    tracing::debug!(relay = %self.options.name, error = %e, "taking the relay lease failed");
                    self.status
                        .send_modify(|s| s.state = RelayState::Retrying(e.to_string()));
                }
            }
            if self.pause(every).await {
                return None;
            }
        }
    }

    /// Relays from the checkpoint while the lease is held.
    async fn relay(&mut self, held: Option<&watch::Receiver<bool>>) -> Ended {
        let durable = self.store.capabilities().durable;
        let mut checkpoints = None;
        if durable {
            match Checkpoints::load(self.store.as_ref(), &self.checkpoint_name()).await {
                Ok((writer, position)) => {
                    checkpoints = Some(writer);
                    self.status.send_modify(|s| {
                        s.checkpoint = position;
                        // A new holder starts where the last checkpoint says, even if this
                        // process had relayed further before it lost the lease.
                        s.relayed_position = position;
                    });
                }
                Err(e) => return Ended::Failed(e),
            }
        }
        let from = self.status.borrow().relayed_position + 1;
        self.pace.relaying_at(from - 1);
        let events = match self.store.subscribe(from, EventFilter::all()).await {
            Ok(events) => events,
            Err(e) => return Ended::Failed(e),
        };
        let mut chunks = events.ready_chunks(self.options.batch);
        let mut stop = self.stop.clone();
        let mut unsaved = 0u64;
        // When the next checkpoint is due (`None`: nothing to save).
        let mut save_at: Option<tokio::time::Instant> = None;
        // Looks left before waiting for the store to wake the relay (see `SPIN`).
        let mut spin = 0u32;
        loop {
            if held.is_some_and(|h| !*h.borrow()) {
                return Ended::LeaseLost;
            }
            if spin > 0
                && !*stop.borrow()
                && save_at.is_none_or(|at| Instant::now() < at.into_std())
            {
                spin -= 1;
                match chunks.next().now_or_never() {
                    Some(chunk) => {
                        // Found more without being woken: keep looking after this chunk.
                        spin = SPIN;
                        match self
                            .relay_chunk(
                                chunk,
                                held,
                                checkpoints.as_mut(),
                                &mut unsaved,
                                &mut save_at,
                            )
                            .await
                        {
                            Ok(()) => {}
                            Err(ended) => return ended,
                        }
                    }
                    None => tokio::task::yield_now().await,
                }
                continue;
            }
            let next = tokio::select! {
                biased;
                () = stopped(&mut stop) => None,
                () = sleep_until(save_at) => {
                    match self.save(checkpoints.as_mut(), &mut unsaved).await {
                        Ok(true) => save_at = None,
                        // Not settled yet: look again shortly.
                        Ok(false) => save_at = Some(tokio::time::Instant::now() + IDLE_RECHECK),
                        Err(ended) => return ended,
                    }
                    continue;
                }
                chunk = chunks.next() => Some(chunk),
            };
            let Some(chunk) = next else {
                // Asked to stop: keep what was published (and, in process, handled).
                return match self.save(checkpoints.as_mut(), &mut unsaved).await {
                    Ok(_) | Err(Ended::Stop) => Ended::Stop,
                    Err(ended) => ended,
                };
            };
            if self.in_process.is_some() {
                spin = SPIN;
            }
            if let Err(ended) = self
                .relay_chunk(
                    chunk,
                    held,
                    checkpoints.as_mut(),
                    &mut unsaved,
                    &mut save_at,
                )
                .await
            {
                return ended;
            }
        }
    }

    /// Publishes one chunk read from the store's subscription (`None`: the subscription
    /// ended), then checkpoints if enough events were published since the last one.
    async fn relay_chunk(
        &mut self,
        chunk: Option<Vec<orchestrator_core::Result<EventEnvelope>>>,
        held: Option<&watch::Receiver<bool>>,
        checkpoints: Option<&mut Checkpoints>,
        unsaved: &mut u64,
        save_at: &mut Option<tokio::time::Instant>,
    ) -> Result<(), Ended> {
        {
            let Some(items) = chunk else {
                return Err(Ended::Failed(Error::Closed {
                    what: format!("the {} store's subscription", self.store.name()),
                }));
            };
            let mut events = Vec::with_capacity(items.len());
            let mut failure = None;
            let mut published = 0;
            for item in items {
                match item {
                    Ok(event) => events.push(event),
                    // A record that can never be read (written by hand, or not upcastable):
                    // reading it again would fail again, and stop the relay for good.
                    // What came before it is published first, in order.
                    Err(error @ Error::Decode { .. }) => {
                        published += self.publish_all(std::mem::take(&mut events), held).await?;
                        self.park_unreadable(&error).await?;
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            published += self.publish_all(events, held).await?;
            if published > 0 {
                *unsaved += published;
                // Due an interval after the first event not checkpointed yet, so a steady
                // stream is checkpointed at least that often too (a new lease holder then
                // publishes again at most about an interval's worth).
                save_at.get_or_insert_with(|| {
                    tokio::time::Instant::now() + self.options.checkpoint_interval
                });
            }
            if *unsaved >= self.options.checkpoint_every {
                *save_at = if self.save(checkpoints, unsaved).await? {
                    None
                } else {
                    Some(tokio::time::Instant::now() + IDLE_RECHECK)
                };
            }
            if let Some(error) = failure {
                return Err(Ended::Failed(error));
            }
        }
        Ok(())
    }

    fn checkpoint_name(&self) -> String {
        format!("relay.{}", self.options.name)
    }

    /// Writes the relayed position as the checkpoint, when there is something to save;
    /// returns `false` when it must wait: on the in-process transport, until every event
    /// published is settled by its handlers (queued events die with the process, so the
    /// checkpoint must not pass them).
    async fn save(
        &self,
        checkpoints: Option<&mut Checkpoints>,
        unsaved: &mut u64,
    ) -> Result<bool, Ended> {
        let Some(checkpoints) = checkpoints else {
            *unsaved = 0;
            return Ok(true);
        };
        if *unsaved == 0 {
            return Ok(true);
        }
        // Read before looking at the queues: everything up to here was published before.
        let position = self.status.borrow().relayed_position;
        if let Some(transport) = &self.in_process {
            // The relay is the transport's publisher: while it waits here, the handlers
            // drain the queues. Waiting a little bounds what a crash under steady load
            // publishes again to about one checkpoint interval.
            let deadline = Instant::now() + DRAIN_WAIT;
            while !transport.is_idle() {
                if Instant::now() >= deadline {
                    return Ok(false);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        match checkpoints
            .save(self.store.as_ref(), &self.checkpoint_name(), position)
            .await
        {
            Ok(()) => {
                *unsaved = 0;
                self.status.send_modify(|s| s.checkpoint = position);
                Ok(true)
            }
            // Someone else wrote the checkpoint: another relay holds the store now.
            Err(Error::InvalidInput { .. }) => Err(Ended::LeaseLost),
            // A store that cannot be written here (opened read-only) cannot keep a checkpoint:
            // relaying from it would publish the same events again and again.
            Err(error @ Error::Unsupported { .. }) => {
                tracing::error!(relay = %self.options.name, %error, "the store cannot keep the relay's checkpoint; the relay stops (build this process with RelayOptions::disabled())");
                Err(Ended::Stop)
            }
            Err(e) => Err(Ended::Failed(e)),
        }
    }

    /// Publishes `events` (in log order) in runs of one event type; returns how many were
    /// published (skipped ones do not count). The relayed position moves after each run.
    async fn publish_all(
        &mut self,
        events: Vec<EventEnvelope>,
        held: Option<&watch::Receiver<bool>>,
    ) -> Result<u64, Ended> {
        let mut published = 0u64;
        let mut run: Vec<EventEnvelope> = Vec::new();
        let mut last_position = 0;
        for event in events {
            let position = event.global_position().unwrap_or(last_position);
            if !self.options.publishes_stream(event.stream_id()) {
                if !run.is_empty() {
                    published += self.publish_run(std::mem::take(&mut run), held).await?;
                }
                self.advance(position);
                last_position = position;
                continue;
            }
            if run
                .first()
                .is_some_and(|first| first.event_type() != event.event_type())
            {
                published += self.publish_run(std::mem::take(&mut run), held).await?;
            }
            last_position = position;
            run.push(event);
        }
        if !run.is_empty() {
            published += self.publish_run(run, held).await?;
        }
        Ok(published)
    }

    fn advance(&self, position: u64) {
        let mut relayed = position;
        let moved = self.status.send_if_modified(|s| {
            let moved = position > s.relayed_position;
            if moved {
                s.relayed_position = position;
            }
            relayed = s.relayed_position;
            moved
        });
        self.pace.relaying_at(relayed);
        if moved && let Some(hook) = &self.on_relayed {
            hook(position);
        }
    }

    /// Publishes one run of events of one type, retrying until the transport takes it;
    /// events it refuses for good are dead-lettered one by one.
    async fn publish_run(
        &mut self,
        run: Vec<EventEnvelope>,
        held: Option<&watch::Receiver<bool>>,
    ) -> Result<u64, Ended> {
        let last = run.last().and_then(EventEnvelope::global_position);
        let count = run.len() as u64;
        let mut attempt = 0u32;
        loop {
            if self.stopping() {
                return Err(Ended::Stop);
            }
            if held.is_some_and(|h| !*h.borrow()) {
                return Err(Ended::LeaseLost);
            }
            let result = if run.len() == 1 {
                self.bus.publish(run[0].clone()).await
            } else {
                self.bus.publish_batch(run.clone()).await
            };
            match result {
                Ok(()) => break,
                Err(Error::Closed { .. }) => return Err(Ended::Stop),
                Err(e) if refused(&e) => {
                    // Find which events the transport refuses: publish one by one.
                    for event in run {
                        self.publish_one_or_park(event, held).await?;
                    }
                    return Ok(count);
                }
                Err(e) => {
                    attempt = attempt.saturating_add(1);
                    let pause = backoff(attempt);
                    tracing::warn!(relay = %self.options.name, error = %e, attempt, ?pause, "publishing stored events failed; retrying");
                    self.status
                        .send_modify(|s| s.state = RelayState::Retrying(e.to_string()));
                    // Publishers have nothing to give way to until the transport is back.
                    self.pace.not_relaying();
                    if self.pause(pause).await {
                        return Err(Ended::Stop);
                    }
                }
            }
        }
        if attempt > 0 {
            self.status.send_modify(|s| s.state = RelayState::Relaying);
        }
        if let Some(last) = last {
            self.advance(last);
        }
        Ok(count)
    }

    async fn publish_one_or_park(
        &mut self,
        event: EventEnvelope,
        held: Option<&watch::Receiver<bool>>,
    ) -> Result<(), Ended> {
        let position = event.global_position();
        let mut attempt = 0u32;
        loop {
            if held.is_some_and(|h| !*h.borrow()) {
                return Err(Ended::LeaseLost);
            }
            match self.bus.publish(event.clone()).await {
                Ok(()) => break,
                Err(Error::Closed { .. }) => return Err(Ended::Stop),
                Err(e) if refused(&e) => {
                    self.park(event, &e).await?;
                    break;
                }
                Err(e) => {
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(relay = %self.options.name, error = %e, attempt, "publishing a stored event failed; retrying");
                    if self.pause(backoff(attempt)).await {
                        return Err(Ended::Stop);
                    }
                }
            }
        }
        if let Some(position) = position {
            self.advance(position);
        }
        Ok(())
    }

    /// Puts an event the transport refuses in its dead-letter queue (retrying until the
    /// queue takes it).
    async fn park(&mut self, event: EventEnvelope, error: &Error) -> Result<(), Ended> {
        tracing::error!(
            relay = %self.options.name,
            event_id = %event.id(),
            event_type = %event.event_type(),
            %error,
            "the transport refuses a stored event; it goes to the dead-letter queue"
        );
        let reason = format!("the outbox relay could not publish it: {error}");
        self.dead_letter(event, reason).await
    }

    /// Dead-letters, as an [`UNDECODABLE_EVENT_TYPE`] event, a record of the store's log that
    /// could not be read as an event, so that the relay goes on after it and someone sees it.
    async fn park_unreadable(&mut self, error: &Error) -> Result<(), Ended> {
        let after = self.status.borrow().relayed_position;
        tracing::error!(
            relay = %self.options.name,
            after_position = after,
            %error,
            "a record of the store cannot be read as an event; it goes to the dead-letter queue"
        );
        let (field, why) = match error {
            Error::Decode { field, reason } => (field.as_str(), reason.as_str()),
            _ => ("$", ""),
        };
        let record = serde_json::json!({
            "store": self.store.name(),
            "after_position": after,
            "field": field,
            "reason": why,
        });
        let event = match EventEnvelope::new(UNDECODABLE_EVENT_TYPE, &record) {
            Ok(event) => event,
            Err(e) => return Err(Ended::Failed(e)),
        };
        let reason = format!(
            "the outbox relay could not read a record of the {} store after position {after}: {error}",
            self.store.name()
        );
        self.dead_letter(event, reason).await
    }

    /// Pushes `event` to the transport's dead-letter queue under the relay's name, retrying
    /// until the queue takes it.
    async fn dead_letter(&mut self, event: EventEnvelope, reason: String) -> Result<(), Ended> {
        let now = chrono::Utc::now();
        let letter = DeadLetter::new(
            event.clone(),
            event.event_type().to_owned(),
            format!("relay:{}", self.options.name),
            reason,
            1,
            now,
            now,
        );
        let queue = self.bus.transport().dead_letter_queue();
        let mut attempt = 0u32;
        loop {
            match queue.push(letter.clone()).await {
                Ok(()) => break,
                Err(e) => {
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(relay = %self.options.name, error = %e, "dead-lettering a refused event failed; retrying");
                    if self.pause(backoff(attempt)).await {
                        return Err(Ended::Stop);
                    }
                }
            }
        }
        self.status.send_modify(|s| s.dead_lettered += 1);
        Ok(())
    }
}

/// How long a due checkpoint holds the relay back for the in-process handlers to settle what
/// was published, before it gives up until the next look.
const DRAIN_WAIT: Duration = Duration::from_millis(100);

/// With the in-process transport, how many times the relay looks again for new events
/// (yielding in between) before it waits to be woken. Being woken costs more than the
/// looks: the store wakes the relay on the publishing task's worker thread, in the slot that
/// no idle worker takes from, so a relay that always waits runs on the publisher's thread,
/// one after the other, while a relay that keeps running is taken by the idle worker and runs
/// beside the publisher. Bounded: once nothing came for this many looks (tens of
/// microseconds), it waits.
const SPIN: u32 = 64;

/// How soon a checkpoint that waits for the in-process transport to settle looks again.
const IDLE_RECHECK: Duration = Duration::from_millis(50);

/// Sleeps until `at`; never resolves for `None`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the relay is asked to stop, or its orchestrator is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: stop as well.
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Whether the transport refuses the event itself, so that retrying cannot help.
fn refused(error: &Error) -> bool {
    matches!(
        error,
        Error::InvalidInput { .. }
            | Error::Encode { .. }
            | Error::Decode { .. }
            | Error::TooLarge { .. }
    )
}

/// 50 ms, doubling, at most 5 s.
fn backoff(attempt: u32) -> Duration {
    let millis = 50u64.saturating_mul(1u64 << attempt.saturating_sub(1).min(7));
    Duration::from_millis(millis.min(5_000))
}

/// A held lease and the task that renews it at a third of its time to live. `held` turns
/// `false` when a renewal says another holder has it, or renewals failed for a whole time to
/// live.
struct Held {
    held: watch::Receiver<bool>,
    keeper: JoinHandle<()>,
}

impl Held {
    fn keep(lease: Arc<dyn Lease>) -> Self {
        let (tx, held) = watch::channel(true);
        let keeper = tokio::spawn(async move {
            orchestrator_core::lease::renew_until_lost(lease.as_ref()).await;
            tx.send_replace(false);
        });
        Self { held, keeper }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_five_seconds() {
        assert_eq!(backoff(1), Duration::from_millis(50));
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(7), Duration::from_millis(3_200));
        assert_eq!(backoff(8), Duration::from_secs(5));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn system_streams_and_saga_logs_are_not_published() {
        let options = RelayOptions::default();
        assert!(options.publishes_stream(Some("order-1")));
        assert!(options.publishes_stream(None));
        assert!(!options.publishes_stream(Some("$checkpoint-relay.default")));
        assert!(!options.publishes_stream(Some("saga-0191")));
    }
}
