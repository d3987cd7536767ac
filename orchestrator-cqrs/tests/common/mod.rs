//! Shared fixtures: a bank account aggregate and stores that misbehave on purpose.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use orchestrator_core::{
    AppendResult, EventEnvelope, EventFilter, EventStore, EventStream, ExpectedVersion, ReadAll,
    StoreCapabilities,
};
use orchestrator_cqrs::{Aggregate, AggregateEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::Barrier;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Account {
    pub open: bool,
    pub owner: String,
    pub balance: i64,
    pub movements: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AccountCommand {
    Open { owner: String },
    Deposit(i64),
    Withdraw(i64),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountEvent {
    Opened { owner: String },
    Deposited { amount: i64 },
    Withdrew { amount: i64 },
}

impl AggregateEvent for AccountEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Opened { .. } => "account.opened",
            Self::Deposited { .. } => "account.deposited",
            Self::Withdrew { .. } => "account.withdrew",
        }
    }
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum Refused {
    #[error("the account is already open")]
    AlreadyOpen,
    #[error("the account is not open")]
    NotOpen,
    #[error("insufficient funds: balance {balance}, asked {asked}")]
    InsufficientFunds { balance: i64, asked: i64 },
    #[error("amounts must be positive")]
    NotPositive,
}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = Refused;

    fn handle(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, Refused> {
        match command {
            AccountCommand::Open { .. } if self.open => Err(Refused::AlreadyOpen),
            AccountCommand::Open { owner } => Ok(vec![AccountEvent::Opened {
                owner: owner.clone(),
            }]),
            _ if !self.open => Err(Refused::NotOpen),
            AccountCommand::Deposit(n) | AccountCommand::Withdraw(n) if *n <= 0 => {
                Err(Refused::NotPositive)
            }
            AccountCommand::Deposit(n) => Ok(vec![AccountEvent::Deposited { amount: *n }]),
            AccountCommand::Withdraw(n) if *n > self.balance => Err(Refused::InsufficientFunds {
                balance: self.balance,
                asked: *n,
            }),
            AccountCommand::Withdraw(n) => Ok(vec![AccountEvent::Withdrew { amount: *n }]),
        }
    }

    fn apply(&mut self, event: AccountEvent) {
        self.movements += 1;
        match event {
            AccountEvent::Opened { owner } => {
                self.open = true;
                self.owner = owner;
            }
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrew { amount } => self.balance -= amount,
        }
    }
}

/// A store whose first `n` appends wait until all `n` have been attempted: every one of
/// them has loaded the same version by then, so all but one conflict.
pub struct BarrierStore<S> {
    pub inner: S,
    barrier: Barrier,
    parties: usize,
    appends: AtomicUsize,
    reads: AtomicUsize,
}

impl<S> BarrierStore<S> {
    pub fn new(inner: S, parties: usize) -> Self {
        Self {
            inner,
            barrier: Barrier::new(parties),
            parties,
            appends: AtomicUsize::new(0),
            reads: AtomicUsize::new(0),
        }
    }

    pub fn appends(&self) -> usize {
        self.appends.load(Ordering::SeqCst)
    }

    /// How many `read_stream` calls it has answered.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl<S: EventStore> EventStore for BarrierStore<S> {
    fn name(&self) -> &'static str {
        "barrier"
    }
    fn capabilities(&self) -> StoreCapabilities {
        self.inner.capabilities()
    }
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventEnvelope>,
    ) -> orchestrator_core::Result<AppendResult> {
        if self.appends.fetch_add(1, Ordering::SeqCst) < self.parties {
            self.barrier.wait().await;
        }
        self.inner.append(stream, expected, events).await
    }
    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> orchestrator_core::Result<Vec<EventEnvelope>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_stream(stream, from_version, limit).await
    }
    async fn read_all(&self, query: ReadAll) -> orchestrator_core::Result<Vec<EventEnvelope>> {
        self.inner.read_all(query).await
    }
    async fn stream_version(&self, stream: &str) -> orchestrator_core::Result<Option<u64>> {
        self.inner.stream_version(stream).await
    }
    async fn head_position(&self) -> orchestrator_core::Result<u64> {
        self.inner.head_position().await
    }
    async fn subscribe(
        &self,
        from_position: u64,
        filter: EventFilter,
    ) -> orchestrator_core::Result<EventStream> {
        self.inner.subscribe(from_position, filter).await
    }
}

/// Shares a store as `Arc<dyn EventStore>`.
pub fn shared(store: impl EventStore) -> Arc<dyn EventStore> {
    Arc::new(store)
}

/// An in-memory store holding account `id`, opened by "ann".
pub async fn store_with_open_account(id: &str) -> orchestrator_store::InMemoryEventStore {
    let events = orchestrator_store::InMemoryEventStore::new();
    orchestrator_cqrs::AggregateRepository::<Account>::new(shared(events.clone()))
        .unwrap()
        .execute(
            id,
            AccountCommand::Open {
                owner: "ann".into(),
            },
        )
        .await
        .unwrap();
    events
}
