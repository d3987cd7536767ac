//! The orchestrator with its event store on PostgreSQL: events published, handled and kept
//! in a table, a saga logged there, dead letters, and an event-sourced aggregate whose
//! stream is a run of rows. Events travel through the PostgreSQL transport (a queue table in
//! the same schema), and dead letters land in its `dead_letters` table.
//!
//! Needs a PostgreSQL at `ORCHESTRATOR_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`; `cargo xtask services up` checks it). The run
//! keeps its tables in a schema of its own, dropped at the end. Run it with
//! `cargo run --example postgres_backend --features postgres`.

mod common;

use std::sync::Arc;

use orchestrator::backends::postgres::{PostgresConfig, PostgresEventStore, PostgresTransport};
use orchestrator::core::EventStore;
use orchestrator::cqrs::{Aggregate, AggregateEvent, AggregateRepository};
use orchestrator::prelude::*;
use serde::{Deserialize, Serialize};

/// A bank account, folded from its events.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Account {
    open: bool,
    balance: i64,
}

#[derive(Clone, Copy)]
enum AccountCommand {
    Open,
    Deposit(i64),
    Withdraw(i64),
}

#[derive(Serialize, Deserialize)]
enum AccountEvent {
    Opened,
    Deposited(i64),
    Withdrew(i64),
}

impl AggregateEvent for AccountEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Opened => "account.opened",
            Self::Deposited(_) => "account.deposited",
            Self::Withdrew(_) => "account.withdrew",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(&'static str);

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = Refused;

    fn handle(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, Refused> {
        match (*command, self.open) {
            (AccountCommand::Open, false) => Ok(vec![AccountEvent::Opened]),
            (AccountCommand::Open, true) => Err(Refused("already open")),
            (_, false) => Err(Refused("not open")),
            (AccountCommand::Deposit(n), true) => Ok(vec![AccountEvent::Deposited(n)]),
            (AccountCommand::Withdraw(n), true) if n > self.balance => {
                Err(Refused("insufficient funds"))
            }
            (AccountCommand::Withdraw(n), true) => Ok(vec![AccountEvent::Withdrew(n)]),
        }
    }

    fn apply(&mut self, event: AccountEvent) {
        match event {
            AccountEvent::Opened => self.open = true,
            AccountEvent::Deposited(n) => self.balance += n,
            AccountEvent::Withdrew(n) => self.balance -= n,
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("ORCHESTRATOR_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    // This run's tables in a schema of its own, dropped at the end.
    let config = PostgresConfig::new(&url)?.with_schema(common::run_name())?;
    let store = PostgresEventStore::connect(config.clone()).await?;
    let transport = PostgresTransport::connect(config).await?;
    let orchestrator = EventOrchestrator::builder()
        .store(Arc::new(store.clone()))
        .transport(Arc::new(transport.clone()))
        .build()
        .await?;
    // Or, in the default schema: .store_url("postgres://user@host/db") and the same
    // .transport_url(…) (`?schema=NAME` to choose one).

    let toured = common::tour(&orchestrator).await;
    let accounts = account_tour(Arc::new(store.clone())).await;
    orchestrator
        .shutdown(std::time::Duration::from_secs(5))
        .await;
    transport.close().await;
    store.drop_schema().await?;
    toured?;
    accounts
}

/// Commands against an aggregate: each loads the account's rows, decides, and appends at
/// the exact version it loaded (the unique `(stream_id, stream_version)` backs the check).
async fn account_tour(store: Arc<dyn EventStore>) -> Result<(), Box<dyn std::error::Error>> {
    let accounts = AggregateRepository::<Account>::new(store.clone())?;
    accounts.execute("a-1", AccountCommand::Open).await?;
    accounts
        .execute("a-1", AccountCommand::Deposit(100))
        .await?;
    let done = accounts
        .execute("a-1", AccountCommand::Withdraw(30))
        .await?;
    println!(
        "  account a-1: balance {} at version {}",
        done.state.balance, done.version
    );
    let refused = accounts
        .execute("a-1", AccountCommand::Withdraw(500))
        .await
        .err()
        .and_then(|e| e.rejection::<Refused>().map(|r| r.0));
    println!("  withdrawing 500 from a-1: refused ({refused:?})");
    let rows = store
        .read_stream(&AggregateRepository::<Account>::stream_id("a-1"), 1, 100)
        .await?;
    for event in rows {
        println!(
            "    row: version {:?}, position {:?}, {}",
            event.stream_version(),
            event.global_position(),
            event.event_type()
        );
    }
    Ok(())
}
