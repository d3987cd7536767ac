//! Leases: one holder at a time, across processes, for work that must run once per store
//! (the outbox relay; saga recovery).
//!
//! A [`Lease`] is taken with [`try_acquire`](Lease::try_acquire) and kept by calling it
//! again well within its [`ttl`](Lease::ttl); a holder that dies (or stops renewing) loses
//! it when the time runs out, and a standby that keeps trying takes over. Stores hand out
//! the lease that fits them through [`EventStore::lease`](crate::EventStore::lease): a
//! process-local one for stores only one process can open, a Redis key for the Redis store.
//!
//! ```
//! use orchestrator_core::lease::{Lease, LocalLease};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> orchestrator_core::Result<()> {
//! let lease = LocalLease::new("relay of the in-memory store");
//! assert!(lease.try_acquire().await?);
//! lease.release().await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;

/// A named lease that at most one holder has at a time.
///
/// Each value is one candidate holder: two values made for the same name (in two processes,
/// or twice in one process) compete for it.
#[async_trait]
pub trait Lease: Send + Sync + 'static {
    /// Where the lease is kept, for logs and errors ("redis key `app:lease:relay`", …).
    fn describe(&self) -> String;

    /// How long the lease lasts without renewal: when its holder dies, a standby takes over
    /// within about this long. Holders renew at a third of it.
    fn ttl(&self) -> Duration;

    /// Takes the lease when it is free, or extends it when this candidate holds it already.
    /// Returns whether this candidate holds it now. An error (the backend is unreachable)
    /// says nothing about who holds it: a holder that cannot renew for a whole
    /// [`ttl`](Self::ttl) must act as if it had lost it.
    async fn try_acquire(&self) -> Result<bool>;

    /// Gives the lease up if this candidate holds it, so that a standby takes over at once.
    async fn release(&self) -> Result<()>;

    /// Whether this process is the only possible holder (a store no other process can use):
    /// then the lease is always held and needs no renewal, and holders skip renewing it.
    fn is_local(&self) -> bool {
        false
    }
}

/// Keeps a held `lease`: renews it at a third of its time to live, and returns once it is
/// lost — a renewal says another candidate holds it, or renewals failed for a whole time to
/// live. Holders run their work beside this and stop it when this returns.
pub async fn renew_until_lost(lease: &dyn Lease) {
    let ttl = lease.ttl();
    let mut renewed = std::time::Instant::now();
    loop {
        tokio::time::sleep(ttl / 3).await;
        match lease.try_acquire().await {
            Ok(true) => renewed = std::time::Instant::now(),
            Ok(false) => return,
            Err(_) if renewed.elapsed() >= ttl => return,
            // A renewal that fails is tried again; the caller hears of the loss, if any.
            Err(_) => {}
        }
    }
}

/// A lease that is always held: for stores that only one process can use (the in-memory
/// store; the file store, which locks its directory), where there is nobody to compete with.
#[derive(Debug, Clone)]
pub struct LocalLease {
    what: String,
}

impl LocalLease {
    /// A local lease; `what` says what it guards, for logs.
    pub fn new(what: impl Into<String>) -> Self {
        Self { what: what.into() }
    }
}

#[async_trait]
impl Lease for LocalLease {
    fn describe(&self) -> String {
        format!("{} (held by this process alone)", self.what)
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs(3)
    }

    async fn try_acquire(&self) -> Result<bool> {
        Ok(true)
    }

    async fn release(&self) -> Result<()> {
        Ok(())
    }

    fn is_local(&self) -> bool {
        true
    }
}
