//! The command bus: validation, idempotency, authorization, middleware order, errors, and
//! commands routed to an aggregate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use common::*;
use orchestrator_core::{EventStore, HandlerError};
use orchestrator_cqrs::{
    AggregateRepository, AuthorizationMiddleware, Command, CommandBus, CommandMiddleware,
    CommandOutcome, CommandRequest, Error, FieldError, FieldErrors, HandlerKind,
    IdempotencyMiddleware, JsonSchemaValidator, LoggingMiddleware, Next,
};
use orchestrator_store::InMemoryEventStore;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Notify;

#[derive(Debug, Serialize, Deserialize)]
struct OpenAccount {
    account_id: String,
    owner: String,
    initial_deposit: i64,
}

impl Command for OpenAccount {
    const NAME: &'static str = "open_account";
    type Output = i64;

    fn validate(&self) -> Vec<FieldError> {
        let mut errors = FieldErrors::new();
        errors.check(
            !self.account_id.is_empty(),
            "/account_id",
            "must not be empty",
        );
        errors.check(!self.owner.trim().is_empty(), "/owner", "must not be blank");
        errors.check(
            self.initial_deposit >= 0,
            "/initial_deposit",
            "must be zero or more",
        );
        errors.into_vec()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Deposit {
    account_id: String,
    amount: i64,
}

impl Command for Deposit {
    const NAME: &'static str = "deposit";
    type Output = i64;
}

/// A bus with the bank commands routed to the account aggregate.
fn bank(bus: &CommandBus, events: Arc<dyn EventStore>) -> AggregateRepository<Account> {
    let accounts = AggregateRepository::<Account>::new(events).unwrap();
    let repo = accounts.clone();
    bus.register_command(move |open: OpenAccount| {
        let repo = repo.clone();
        async move {
            repo.execute(&open.account_id, AccountCommand::Open { owner: open.owner })
                .await?;
            let mut balance = 0;
            if open.initial_deposit > 0 {
                let command = AccountCommand::Deposit(open.initial_deposit);
                balance = repo.execute(&open.account_id, command).await?.state.balance;
            }
            Ok::<_, HandlerError>(balance)
        }
    })
    .unwrap();
    let repo = accounts.clone();
    bus.register_command(move |deposit: Deposit| {
        let repo = repo.clone();
        async move {
            let command = AccountCommand::Deposit(deposit.amount);
            let executed = repo.execute(&deposit.account_id, command).await?;
            Ok::<_, HandlerError>(executed.state.balance)
        }
    })
    .unwrap();
    accounts
}

#[tokio::test]
async fn validation_reports_every_field_error_and_skips_the_handler() {
    let bus = CommandBus::new();
    let events = shared(InMemoryEventStore::new());
    bank(&bus, events.clone());

    let invalid = OpenAccount {
        account_id: String::new(),
        owner: " ".into(),
        initial_deposit: -5,
    };
    let err = bus.execute(invalid).await.unwrap_err();
    let Error::Validation { kind, name, errors } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(
        (*kind, name.as_str()),
        (HandlerKind::Command, "open_account")
    );
    let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["/account_id", "/owner", "/initial_deposit"]);
    assert_eq!(
        events.head_position().await.unwrap(),
        0,
        "the handler did not run"
    );

    // A dynamic payload that does not fit the typed command is a validation error too.
    let err = bus
        .send(
            "open_account",
            json!({ "account_id": "a", "initial_deposit": 1 }),
        )
        .await
        .unwrap_err();
    assert_eq!(err.field_errors().unwrap()[0].field, "/owner");
}

#[tokio::test]
async fn dynamic_commands_validate_with_a_json_schema() {
    let bus = CommandBus::new();
    let runs = Arc::new(AtomicU32::new(0));
    let counter = runs.clone();
    let schema = JsonSchemaValidator::new(&json!({
        "type": "object",
        "required": ["name", "email"],
        "properties": {
            "name": { "type": "string", "minLength": 1 },
            "age": { "type": "integer", "minimum": 0 }
        }
    }))
    .unwrap();
    bus.register_with_validator("create_user", schema, move |_: Value| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, HandlerError>(json!({ "user_id": "USER123", "created": true })) }
    })
    .unwrap();

    let err = bus
        .send("create_user", json!({ "name": "", "age": -1 }))
        .await
        .unwrap_err();
    let fields: Vec<_> = err
        .field_errors()
        .unwrap()
        .iter()
        .map(|e| e.field.clone())
        .collect();
    assert_eq!(fields, ["/age", "/email", "/name"]);
    assert!(!err.is_temporary());
    assert_eq!(runs.load(Ordering::SeqCst), 0);

    let ok = bus
        .send(
            "create_user",
            json!({ "name": "John", "email": "j@example.com" }),
        )
        .await
        .unwrap();
    assert_eq!(ok.value["user_id"], "USER123");
    assert_eq!(ok.position, None, "it appended nothing");
}

#[tokio::test]
async fn typed_commands_reach_the_aggregate_and_report_their_position() {
    let bus = CommandBus::new();
    let events = shared(InMemoryEventStore::new());
    bank(&bus, events.clone());
    let opened = bus
        .execute(OpenAccount {
            account_id: "a-1".into(),
            owner: "ann".into(),
            initial_deposit: 50,
        })
        .await
        .unwrap();
    assert_eq!(
        (opened.value, opened.position),
        (50, Some(2)),
        "two events, up to 2"
    );

    let deposited = bus
        .dispatch(
            CommandRequest::new("deposit", json!({ "account_id": "a-1", "amount": 25 }))
                .with_id("cmd-7")
                .with_correlation_id("signup-1"),
        )
        .await
        .unwrap();
    assert_eq!((deposited.value, deposited.position), (json!(75), Some(3)));
    let stored = events.read_stream("account-a-1", 3, 1).await.unwrap();
    assert_eq!(stored[0].causation_id(), Some("cmd-7"));
    assert_eq!(stored[0].correlation_id(), Some("signup-1"));

    // The aggregate's refusal comes back as itself, not as an opaque handler failure.
    let err = bus
        .send("deposit", json!({ "account_id": "nobody", "amount": 1 }))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Handler { .. }), "{err:?}");
    assert!(err.to_string().contains("not open"), "{err}");
}

#[tokio::test]
async fn bad_input_is_reported_clearly() {
    let bus = CommandBus::new();
    let err = bus.send("nope", json!({})).await.unwrap_err();
    assert!(
        matches!(&err, Error::NoHandler { kind: HandlerKind::Command, name } if name == "nope")
    );
    assert!(
        err.to_string()
            .contains("no command handler is registered for `nope`")
    );

    let handler = |_: Value| async { Ok::<_, HandlerError>(Value::Null) };
    bus.register("a", handler).unwrap();
    assert!(matches!(
        bus.register("a", handler),
        Err(Error::AlreadyRegistered { .. })
    ));
    assert!(matches!(
        bus.register("", handler),
        Err(Error::InvalidInput { .. })
    ));
    assert!(matches!(
        bus.register("a\nb", handler),
        Err(Error::InvalidInput { .. })
    ));
    assert_eq!(bus.command_names(), ["a"]);
    assert!(bus.has_handler("a") && !bus.has_handler("b"));

    bus.register("fails", |_: Value| async {
        Err::<Value, _>(HandlerError::permanent("the user service is gone"))
    })
    .unwrap();
    let err = bus.send("fails", json!({})).await.unwrap_err();
    match &err {
        Error::Handler { kind, name, error } => {
            assert_eq!((*kind, name.as_str()), (HandlerKind::Command, "fails"));
            assert!(!error.is_retryable());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "command `fails` failed: the user service is gone"
    );

    // A typed result that is not what the caller expects.
    bus.register("deposit", |_: Value| async {
        Ok::<_, HandlerError>(json!("many"))
    })
    .unwrap();
    let err = bus
        .execute(Deposit {
            account_id: "a".into(),
            amount: 1,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
}

fn counting_bus(runs: &Arc<AtomicU32>, gate: Option<Arc<Notify>>) -> CommandBus {
    let bus = CommandBus::builder()
        .middleware(LoggingMiddleware)
        .middleware(IdempotencyMiddleware::default())
        .build();
    let runs = runs.clone();
    bus.register("pay", move |input: Value| {
        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
        let gate = gate.clone();
        async move {
            if let Some(gate) = gate {
                gate.notified().await;
            }
            if input["fail"] == true && n == 1 {
                return Err(HandlerError::retryable("the bank timed out"));
            }
            Ok::<_, HandlerError>(json!({ "payment": n }))
        }
    })
    .unwrap();
    bus
}

#[tokio::test]
async fn a_repeated_command_id_returns_the_first_result_without_running_again() {
    let runs = Arc::new(AtomicU32::new(0));
    let bus = counting_bus(&runs, None);
    let pay = |id: &str| CommandRequest::new("pay", json!({ "amount": 10 })).with_id(id);

    let first = bus.dispatch(pay("p-1")).await.unwrap();
    let again = bus.dispatch(pay("p-1")).await.unwrap();
    assert_eq!(first.value, json!({ "payment": 1 }));
    assert_eq!(again.value, first.value);
    assert!(!first.replayed && again.replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Another id, or no id, runs.
    assert_eq!(
        bus.dispatch(pay("p-2")).await.unwrap().value,
        json!({ "payment": 2 })
    );
    assert_eq!(
        bus.send("pay", json!({ "amount": 10 }))
            .await
            .unwrap()
            .value["payment"],
        3
    );
    assert_eq!(
        bus.send("pay", json!({ "amount": 10 }))
            .await
            .unwrap()
            .value["payment"],
        4
    );

    // The same id with another payload is a client error.
    let reused = CommandRequest::new("pay", json!({ "amount": 99 })).with_id("p-1");
    assert!(matches!(
        bus.dispatch(reused).await,
        Err(Error::IdempotencyKeyReused { .. })
    ));
    // Key order does not make a payload different.
    let reordered = CommandRequest::new("pay", json!({ "amount": 10 })).with_id("p-1");
    assert!(bus.dispatch(reordered).await.unwrap().replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_wait_for_the_first() {
    let runs = Arc::new(AtomicU32::new(0));
    let gate = Arc::new(Notify::new());
    let bus = counting_bus(&runs, Some(gate.clone()));
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let bus = bus.clone();
            tokio::spawn(async move {
                bus.dispatch(CommandRequest::new("pay", json!({})).with_id("same"))
                    .await
            })
        })
        .collect();
    // Let the handler finish only once it has started: duplicates are waiting or not yet
    // arrived; either way none of them may run it again.
    while runs.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    gate.notify_one();
    let outcomes: Vec<CommandOutcome> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(outcomes.iter().all(|o| o.value == json!({ "payment": 1 })));
    assert_eq!(outcomes.iter().filter(|o| !o.replayed).count(), 1);
}

#[tokio::test]
async fn a_failed_first_attempt_lets_the_same_id_run_again() {
    let runs = Arc::new(AtomicU32::new(0));
    let bus = counting_bus(&runs, None);
    let pay = || CommandRequest::new("pay", json!({ "fail": true })).with_id("p-9");
    let err = bus.dispatch(pay()).await.unwrap_err();
    assert!(err.is_temporary(), "{err:?}");
    let retried = bus.dispatch(pay()).await.unwrap();
    assert_eq!(
        (retried.value, retried.replayed),
        (json!({ "payment": 2 }), false)
    );
    assert!(bus.dispatch(pay()).await.unwrap().replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// Records the order middleware runs in.
struct Trace(&'static str, Arc<Mutex<Vec<String>>>);

#[async_trait]
impl CommandMiddleware for Trace {
    async fn handle(
        &self,
        request: CommandRequest,
        next: Next<'_>,
    ) -> orchestrator_cqrs::Result<CommandOutcome> {
        self.1.lock().unwrap().push(format!("{} in", self.0));
        let outcome = next.run(request).await;
        self.1.lock().unwrap().push(format!("{} out", self.0));
        outcome
    }
}

#[tokio::test]
async fn middleware_runs_in_order_and_authorization_refuses_before_the_handler() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let only_admins = |request: &CommandRequest| match request.principal.as_deref() {
        Some("admin") => Ok(()),
        Some(other) => Err(format!("`{other}` is not an admin")),
        None => Err("anonymous".to_owned()),
    };
    let bus = CommandBus::builder()
        .middleware(Trace("outer", log.clone()))
        .middleware(AuthorizationMiddleware::new(only_admins))
        .middleware(Trace("inner", log.clone()))
        .build();
    let handler_log = log.clone();
    bus.register("purge", move |_: Value| {
        handler_log.lock().unwrap().push("handler".into());
        async { Ok::<_, HandlerError>(json!("purged")) }
    })
    .unwrap();

    let refused = bus
        .dispatch(CommandRequest::new("purge", json!({})).with_principal("bob"))
        .await
        .unwrap_err();
    match refused {
        Error::Unauthorized { command, reason } => {
            assert_eq!(
                (command.as_str(), reason.as_str()),
                ("purge", "`bob` is not an admin")
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(*log.lock().unwrap(), ["outer in", "outer out"]);
    log.lock().unwrap().clear();

    let done = bus
        .dispatch(CommandRequest::new("purge", json!({})).with_principal("admin"))
        .await
        .unwrap();
    assert_eq!(done.value, "purged");
    assert_eq!(
        *log.lock().unwrap(),
        ["outer in", "inner in", "handler", "inner out", "outer out"]
    );
}

#[tokio::test]
async fn a_command_that_sends_another_reports_the_others_writes() {
    let bus = CommandBus::new();
    let events = shared(InMemoryEventStore::new());
    bank(&bus, events);
    let inner = bus.clone();
    bus.register("open_and_fund", move |_: Value| {
        let bus = inner.clone();
        async move {
            let open = OpenAccount {
                account_id: "a-9".into(),
                owner: "zoe".into(),
                initial_deposit: 0,
            };
            bus.execute(open).await?;
            let fund = Deposit {
                account_id: "a-9".into(),
                amount: 5,
            };
            let funded = bus.execute(fund).await?;
            Ok::<_, HandlerError>(json!(funded.value))
        }
    })
    .unwrap();
    let outcome = bus.send("open_and_fund", json!({})).await.unwrap();
    assert_eq!((outcome.value, outcome.position), (json!(5), Some(2)));
}

/// A command that counts how often it is serialized.
#[derive(Debug, Deserialize)]
struct Counted {
    n: i64,
    #[serde(skip)]
    serialized: Option<Arc<AtomicU32>>,
}

impl Serialize for Counted {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if let Some(count) = &self.serialized {
            count.fetch_add(1, Ordering::SeqCst);
        }
        #[derive(Serialize)]
        struct Plain {
            n: i64,
        }
        Plain { n: self.n }.serialize(serializer)
    }
}

impl Command for Counted {
    const NAME: &'static str = "counted";
    type Output = Vec<i64>;

    fn validate(&self) -> Vec<FieldError> {
        let mut errors = FieldErrors::new();
        errors.check(self.n >= 0, "/n", "must be zero or more");
        errors.into_vec()
    }
}

fn counted_bus(bus: CommandBus) -> CommandBus {
    bus.register_command(|c: Counted| async move { Ok::<_, HandlerError>(vec![c.n, c.n * 2]) })
        .unwrap();
    bus
}

#[tokio::test]
async fn typed_commands_skip_json_unless_a_middleware_reads_it() {
    let serialized = Arc::new(AtomicU32::new(0));
    let command = |n| Counted {
        n,
        serialized: Some(serialized.clone()),
    };

    // No middleware: the typed command reaches its handler as it is, still validated.
    let bus = counted_bus(CommandBus::new());
    let done = bus.execute(command(4)).await.unwrap();
    assert_eq!((done.value, done.replayed), (vec![4, 8], false));
    assert_eq!(serialized.load(Ordering::SeqCst), 0);
    let err = bus.execute(command(-1)).await.unwrap_err();
    assert_eq!(err.field_errors().unwrap()[0].field, "/n");
    // The same handler still takes JSON.
    let sent = bus.send("counted", json!({ "n": 3 })).await.unwrap();
    assert_eq!(sent.value, json!([3, 6]));

    // With middleware, it sees the command as JSON, as before.
    let log = Arc::new(Mutex::new(Vec::new()));
    let bus = counted_bus(
        CommandBus::builder()
            .middleware(Trace("seen", log.clone()))
            .build(),
    );
    let done = bus.execute(command(5)).await.unwrap();
    assert_eq!(done.value, vec![5, 10]);
    assert_eq!(serialized.load(Ordering::SeqCst), 1);
    assert_eq!(*log.lock().unwrap(), ["seen in", "seen out"]);

    // A JSON handler under the typed command's name gets it as JSON.
    let bus = CommandBus::new();
    bus.register("counted", |input: Value| async move {
        Ok::<_, HandlerError>(json!([input["n"], 0]))
    })
    .unwrap();
    assert_eq!(bus.execute(command(7)).await.unwrap().value, vec![7, 0]);
    assert_eq!(serialized.load(Ordering::SeqCst), 2);
}
