//! Time as a seam: the system clock in production, a manual clock in tests.
//!
//! ```
//! use std::time::Duration;
//! use orchestrator_core::{Clock, ManualClock};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let clock = ManualClock::starting_at_epoch();
//! let start = clock.now();
//! let sleeper = { let c = clock.clone(); tokio::spawn(async move { c.sleep(Duration::from_secs(60)).await }) };
//! tokio::task::yield_now().await;
//! clock.advance(Duration::from_secs(60));
//! sleeper.await.unwrap();
//! assert_eq!(clock.now() - start, chrono::Duration::seconds(60));
//! # }
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::oneshot;

/// A source of the current time and of sleeps.
#[async_trait]
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
    /// Waits until `duration` has passed on this clock.
    async fn sleep(&self, duration: Duration);
}

/// The system clock and tokio's timer.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

#[async_trait]
impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
    async fn sleep(&self, duration: Duration) {
        tokio::time::sleep(duration).await;
    }
}

/// A clock that moves only when told to; sleepers wake when [`ManualClock::advance`] passes
/// their deadline.
#[derive(Debug, Clone)]
pub struct ManualClock {
    inner: Arc<Mutex<ManualState>>,
}

#[derive(Debug)]
struct ManualState {
    now: DateTime<Utc>,
    sleepers: Vec<(DateTime<Utc>, oneshot::Sender<()>)>,
}

impl ManualClock {
    /// A clock showing `now`.
    pub fn new(now: DateTime<Utc>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(ManualState {
                now,
                sleepers: Vec::new(),
            })),
        }
    }

    /// A clock showing 1970-01-01T00:00:00Z.
    pub fn starting_at_epoch() -> Self {
        Self::new(DateTime::<Utc>::UNIX_EPOCH)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ManualState> {
        // A panic while holding this lock cannot leave the state half-updated (every
        // critical section is a single assignment or a Vec operation), so poisoning is
        // safe to ignore.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the clock forward and wakes every sleeper whose deadline has come.
    pub fn advance(&self, by: Duration) {
        let mut state = self.state();
        state.now += chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        let now = state.now;
        let (due, waiting): (Vec<_>, Vec<_>) = state
            .sleepers
            .drain(..)
            .partition(|(deadline, _)| *deadline <= now);
        state.sleepers = waiting;
        drop(state);
        for (_, wake) in due {
            let _ = wake.send(());
        }
    }

    /// Sets the clock to `now` (forward only; earlier times are ignored).
    pub fn set(&self, now: DateTime<Utc>) {
        let current = self.now();
        if now > current {
            self.advance((now - current).to_std().unwrap_or_default());
        }
    }

    /// How many sleepers are waiting.
    pub fn sleepers(&self) -> usize {
        self.state().sleepers.len()
    }
}

#[async_trait]
impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        self.state().now
    }

    async fn sleep(&self, duration: Duration) {
        let rx = {
            let mut state = self.state();
            if duration.is_zero() {
                return;
            }
            let deadline =
                state.now + chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX);
            let (tx, rx) = oneshot::channel();
            state.sleepers.push((deadline, tx));
            rx
        };
        // A dropped sender means the clock itself is gone; nothing will ever wake us, so
        // return rather than hang.
        let _ = rx.await;
    }
}
