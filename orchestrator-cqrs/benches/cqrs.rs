//! Command round trip — load (with snapshot), handle, append — on the in-memory store,
//! against `cqrs-es` 0.5 with its in-memory `MemStore`, on the same bank-account aggregate,
//! in the same run.
//!
//! Run with `cargo bench -p orchestrator-cqrs --bench cqrs` (add
//! `-- --measurement-time 2 --warm-up-time 1` for a short run). A *session* opens a fresh
//! account and sends it `N - 1` more commands (deposits, and a withdrawal every fourth), so
//! streams grow to `N` events; sessions of 10 and of 100 commands are measured. Variants:
//!
//! - `orchestrator/repository`: [`AggregateRepository::execute`], snapshots every 10 events
//!   in an `InMemorySnapshotStore`;
//! - `orchestrator/repository+cache`: the same with
//!   [`AggregateRepository::with_cache`] (the state after each command kept in memory, so
//!   the next command on the account skips the load);
//! - `orchestrator/command-bus`: the cached repository behind the [`CommandBus`] with typed
//!   commands (serde round trip of command and result, validation, span, metrics);
//! - `cqrs-es/mem-store`: `CqrsFramework::execute` over `MemStore` (which has no
//!   snapshots, replays every event on each command, and prints two lines to stdout per
//!   command — run with stdout sent to `/dev/null`, the report goes to stderr).
//!
//! After criterion, a report on stderr: the median commands/s of each variant over 7
//! rounds, and the ratio to `cqrs-es` (target ≥ 1.5), beside the floor under any command
//! on this store — building one event and appending it, nothing else.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cqrs_es::event_sink::EventSink;
use cqrs_es::mem_store::MemStore;
use cqrs_es::{CqrsFramework, DomainEvent};
use criterion::{BenchmarkId, Criterion, Throughput};
use orchestrator_core::HandlerError;
use orchestrator_cqrs::{Aggregate, AggregateEvent, AggregateRepository, Command, CommandBus};
use orchestrator_store::InMemoryEventStore;
use orchestrator_store::snapshot::{InMemorySnapshotStore, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;

// ---- The aggregate, once per framework, with the same rules. -------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
enum BankCommand {
    Open,
    Deposit(i64),
    Withdraw(i64),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum BankEvent {
    Opened,
    Deposited { amount: i64 },
    Withdrew { amount: i64 },
}

#[derive(Debug, thiserror::Error)]
enum BankError {
    #[error("already open")]
    AlreadyOpen,
    #[error("not open")]
    NotOpen,
    #[error("insufficient funds")]
    InsufficientFunds,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Account {
    open: bool,
    balance: i64,
}

impl Account {
    fn decide(&self, command: BankCommand) -> Result<BankEvent, BankError> {
        match (command, self.open) {
            (BankCommand::Open, true) => Err(BankError::AlreadyOpen),
            (BankCommand::Open, false) => Ok(BankEvent::Opened),
            (_, false) => Err(BankError::NotOpen),
            (BankCommand::Deposit(amount), true) => Ok(BankEvent::Deposited { amount }),
            (BankCommand::Withdraw(amount), true) if amount > self.balance => {
                Err(BankError::InsufficientFunds)
            }
            (BankCommand::Withdraw(amount), true) => Ok(BankEvent::Withdrew { amount }),
        }
    }

    fn evolve(&mut self, event: BankEvent) {
        match event {
            BankEvent::Opened => self.open = true,
            BankEvent::Deposited { amount } => self.balance += amount,
            BankEvent::Withdrew { amount } => self.balance -= amount,
        }
    }
}

impl AggregateEvent for BankEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Opened => "account.opened",
            Self::Deposited { .. } => "account.deposited",
            Self::Withdrew { .. } => "account.withdrew",
        }
    }
}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Command = BankCommand;
    type Event = BankEvent;
    type Error = BankError;

    fn handle(&self, command: &BankCommand) -> Result<Vec<BankEvent>, BankError> {
        self.decide(*command).map(|e| vec![e])
    }

    fn apply(&mut self, event: BankEvent) {
        self.evolve(event);
    }
}

/// The same account for cqrs-es.
#[derive(Debug, Default, Serialize, Deserialize)]
struct EsAccount(Account);

impl DomainEvent for BankEvent {
    fn event_type(&self) -> String {
        AggregateEvent::event_type(self).to_owned()
    }
    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

impl cqrs_es::Aggregate for EsAccount {
    const TYPE: &'static str = "account";
    type Command = BankCommand;
    type Event = BankEvent;
    type Error = BankError;
    type Services = ();

    async fn handle(
        &mut self,
        command: BankCommand,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), BankError> {
        let event = self.0.decide(command)?;
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: BankEvent) {
        self.0.evolve(event);
    }
}

/// The typed command for the command bus.
#[derive(Serialize, Deserialize)]
struct AccountCommand {
    account_id: String,
    command: BankCommand,
}

impl Command for AccountCommand {
    const NAME: &'static str = "account";
    type Output = i64;
}

// ---- The variants. ---------------------------------------------------------------------------

/// The `i`-th command of a session.
fn command(i: usize) -> BankCommand {
    match i {
        0 => BankCommand::Open,
        i if i % 4 == 0 => BankCommand::Withdraw(5),
        _ => BankCommand::Deposit(10),
    }
}

#[derive(Clone, Copy, Debug)]
enum Variant {
    Repository,
    RepositoryCached,
    CommandBus,
    CqrsEs,
}

impl Variant {
    const ALL: [Self; 4] = [
        Self::Repository,
        Self::RepositoryCached,
        Self::CommandBus,
        Self::CqrsEs,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Repository => "orchestrator/repository",
            Self::RepositoryCached => "orchestrator/repository+cache",
            Self::CommandBus => "orchestrator/command-bus",
            Self::CqrsEs => "cqrs-es/mem-store",
        }
    }
}

/// A fresh store and framework for `variant`, able to run sessions.
enum Setup {
    Repository(AggregateRepository<Account>),
    CommandBus(CommandBus),
    CqrsEs(CqrsFramework<EsAccount, MemStore<EsAccount>>),
}

/// The cached variants' capacity: every account of a round fits.
const CACHED: usize = 10_000;

fn repository() -> AggregateRepository<Account> {
    AggregateRepository::<Account>::new(Arc::new(InMemoryEventStore::new()))
        .expect("the in-memory store checks versions")
        .with_snapshots(
            Arc::new(InMemorySnapshotStore::new()),
            SnapshotPolicy::every_n_events(10),
        )
}

impl Setup {
    fn new(variant: Variant) -> Self {
        match variant {
            Variant::Repository => Self::Repository(repository()),
            Variant::RepositoryCached => Self::Repository(repository().with_cache(CACHED)),
            Variant::CommandBus => {
                let bus = CommandBus::new();
                let accounts = repository().with_cache(CACHED);
                bus.register_command(move |c: AccountCommand| {
                    let accounts = accounts.clone();
                    async move {
                        let done = accounts.execute(&c.account_id, c.command).await?;
                        Ok::<_, HandlerError>(done.state.balance)
                    }
                })
                .unwrap();
                Self::CommandBus(bus)
            }
            Variant::CqrsEs => Self::CqrsEs(CqrsFramework::new(MemStore::default(), vec![], ())),
        }
    }

    /// Opens account `id` and sends it `commands - 1` more commands.
    async fn session(&self, id: &str, commands: usize) {
        for i in 0..commands {
            let command = command(i);
            match self {
                Self::Repository(accounts) => {
                    accounts.execute(id, command).await.unwrap();
                }
                Self::CommandBus(bus) => {
                    let account_id = id.to_owned();
                    bus.execute(AccountCommand {
                        account_id,
                        command,
                    })
                    .await
                    .unwrap();
                }
                Self::CqrsEs(cqrs) => cqrs.execute(id, command).await.unwrap(),
            }
        }
    }
}

static ACCOUNTS: AtomicU64 = AtomicU64::new(0);

/// Runs `sessions` sessions of `commands` commands on a fresh setup; returns the time taken.
fn run(runtime: &Runtime, variant: Variant, sessions: u64, commands: usize) -> Duration {
    let setup = Setup::new(variant);
    runtime.block_on(async {
        let start = Instant::now();
        for _ in 0..sessions {
            let id = format!("acc-{}", ACCOUNTS.fetch_add(1, Ordering::Relaxed));
            setup.session(&id, commands).await;
        }
        start.elapsed()
    })
}

fn bench(c: &mut Criterion, runtime: &Runtime) {
    for commands in [10, 100] {
        let mut group = c.benchmark_group(format!("session of {commands} commands"));
        group.throughput(Throughput::Elements(commands as u64));
        for variant in Variant::ALL {
            group.bench_function(BenchmarkId::from_parameter(variant.name()), |b| {
                b.iter_custom(|sessions| run(runtime, variant, sessions, commands));
            });
        }
        group.finish();
    }
}

/// The floor under every command: building one event and appending it with an exact
/// expected version, nothing else (events/s).
fn raw_appends(runtime: &Runtime, sessions: u64, commands: usize) -> f64 {
    use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion};
    let store = InMemoryEventStore::new();
    runtime.block_on(async {
        let start = Instant::now();
        for _ in 0..sessions {
            let stream = format!("account-acc-{}", ACCOUNTS.fetch_add(1, Ordering::Relaxed));
            for i in 0..commands {
                let event =
                    EventEnvelope::new("account.deposited", &BankEvent::Deposited { amount: 10 })
                        .unwrap();
                store
                    .append(&stream, ExpectedVersion::Exact(i as u64), vec![event])
                    .await
                    .unwrap();
            }
        }
        (sessions as f64 * commands as f64) / start.elapsed().as_secs_f64()
    })
}

/// Median commands/s of each variant over 7 rounds of about `commands_per_round` commands.
fn report(runtime: &Runtime) {
    eprintln!("\n== command round trip: median commands/s over 7 rounds ==");
    for commands in [10, 100] {
        let sessions = (20_000 / commands) as u64;
        let mut rates = Vec::new();
        for variant in Variant::ALL {
            let mut samples: Vec<f64> = (0..7)
                .map(|_| {
                    let took = run(runtime, variant, sessions, commands);
                    (sessions as f64 * commands as f64) / took.as_secs_f64()
                })
                .collect();
            samples.sort_by(f64::total_cmp);
            rates.push((variant, samples[3]));
        }
        let baseline = rates
            .iter()
            .find(|(v, _)| matches!(v, Variant::CqrsEs))
            .map(|(_, r)| *r)
            .unwrap();
        let mut floor: Vec<f64> = (0..7)
            .map(|_| raw_appends(runtime, sessions, commands))
            .collect();
        floor.sort_by(f64::total_cmp);
        eprintln!("-- sessions of {commands} commands (streams grow to {commands} events)");
        eprintln!(
            "   {:<30} {:>10.0} events/s     {:>5.2}x cqrs-es (the store's own floor)",
            "build event + append only",
            floor[3],
            floor[3] / baseline
        );
        for (variant, rate) in rates {
            eprintln!(
                "   {:<30} {:>10.0} commands/s   {:>5.2}x cqrs-es",
                variant.name(),
                rate,
                rate / baseline
            );
        }
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion, &runtime);
    criterion.final_summary();
    report(&runtime);
}
