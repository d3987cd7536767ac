//! The command bus: one handler per command name, validation before the handler, a
//! middleware chain around it, and an outcome that says where the command wrote.
//!
//! A command is sent by name with a JSON payload ([`CommandBus::send`]) — the dynamic form
//! the facade uses — or as a typed [`Command`] ([`CommandBus::execute`]). Either way:
//!
//! 1. the handler is looked up ([`Error::NoHandler`] if there is none);
//! 2. the middleware runs, outermost first ([`middleware`]: logging, authorization,
//!    idempotency by command id, or your own);
//! 3. the input is validated — a typed command by [`Command::validate`], a dynamic one by the
//!    [`Validator`] it was registered with — and **every** field error is reported at once
//!    in [`Error::Validation`]; the handler does not run;
//! 4. the handler runs in a [command scope](crate::context), which records the global
//!    position of the events it appends, reported as [`CommandOutcome::position`].
//!
//! Each command runs in a span `cqrs.command` (fields `command`, `command_id`) and is timed
//! in [`COMMAND_DURATION`](crate::telemetry::COMMAND_DURATION).

mod idempotency;
pub mod middleware;

use std::any::TypeId;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use orchestrator_core::{HandlerError, JsonHandler};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::Instrument;

use crate::context::{self, CommandInfo};
use crate::error::{Error, HandlerKind, Result};
use crate::handler::{DynHandler, Dynamic, Typed};
use crate::telemetry;
use crate::validation::{FieldError, Validator};

pub use idempotency::IdempotencyMiddleware;
pub use middleware::{
    AuthorizationMiddleware, Authorizer, CommandMiddleware, LoggingMiddleware, Next,
};

/// A typed command: a serde type with a stable name, a typed result and its own validation.
///
/// ```
/// use orchestrator_cqrs::{Command, FieldError, FieldErrors};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct CreateUser { name: String, age: i64 }
///
/// impl Command for CreateUser {
///     const NAME: &'static str = "create_user";
///     type Output = String; // the new user's id
///
///     fn validate(&self) -> Vec<FieldError> {
///         let mut errors = FieldErrors::new();
///         errors.check(!self.name.trim().is_empty(), "/name", "must not be blank");
///         errors.check(self.age >= 0, "/age", "must be zero or more");
///         errors.into_vec()
///     }
/// }
/// assert_eq!(CreateUser { name: " ".into(), age: -1 }.validate().len(), 2);
/// ```
pub trait Command: Serialize + DeserializeOwned + Send + 'static {
    /// The command's name, under which its handler is registered.
    const NAME: &'static str;
    /// What the handler returns.
    type Output: Serialize + DeserializeOwned + Send + 'static;

    /// Every problem with the command (empty: valid). The default accepts everything.
    fn validate(&self) -> Vec<FieldError> {
        Vec::new()
    }
}

/// A command on its way through the bus: name, JSON payload, and who sent it why.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CommandRequest {
    /// The command's name.
    pub name: Arc<str>,
    /// The payload.
    pub payload: Value,
    /// The command id: the idempotency key, and the causation id of the events it causes.
    pub id: Option<Arc<str>>,
    /// The correlation id of the business transaction, stamped on the events it causes.
    pub correlation_id: Option<Arc<str>>,
    /// Who sends it, for the authorization hook.
    pub principal: Option<String>,
    /// Free metadata for middleware.
    pub headers: BTreeMap<String, String>,
}

impl CommandRequest {
    /// A command `name` with `payload`.
    pub fn new(name: impl Into<Arc<str>>, payload: Value) -> Self {
        Self {
            name: name.into(),
            payload,
            id: None,
            correlation_id: None,
            principal: None,
            headers: BTreeMap::new(),
        }
    }

    /// A typed command, serialized.
    pub fn from_command<C: Command>(command: &C) -> Result<Self> {
        let payload = serde_json::to_value(command).map_err(|e| {
            Error::invalid("command", format!("`{}` does not serialize: {e}", C::NAME))
        })?;
        Ok(Self::new(C::NAME, payload))
    }

    /// Sets the command id (the idempotency key).
    pub fn with_id(mut self, id: impl Into<Arc<str>>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, id: impl Into<Arc<str>>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the principal.
    pub fn with_principal(mut self, principal: impl Into<String>) -> Self {
        self.principal = Some(principal.into());
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
}

/// What a command returned, and where it wrote.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CommandOutcome<T = Value> {
    /// The handler's result.
    pub value: T,
    /// The global position of the last event the command appended (`None`: it appended
    /// nothing, or appended without recording it). Pass it to
    /// [`QueryRequest::at_least`](crate::QueryRequest::at_least) to read your writes.
    pub position: Option<u64>,
    /// Whether this is the stored outcome of an earlier command with the same id, returned
    /// without running the handler again.
    pub replayed: bool,
}

impl<T> CommandOutcome<T> {
    /// An outcome of a handler that ran now.
    pub fn new(value: T, position: Option<u64>) -> Self {
        Self {
            value,
            position,
            replayed: false,
        }
    }

    /// Marks the outcome as replayed from an earlier run.
    pub fn replayed(mut self) -> Self {
        self.replayed = true;
        self
    }
}

impl CommandOutcome {
    /// Decodes the value into the typed result `T`.
    pub fn decode<T: DeserializeOwned>(self) -> Result<CommandOutcome<T>> {
        let value = serde_json::from_value(self.value).map_err(|e| {
            Error::invalid(
                "command result",
                format!("does not fit the typed output: {e}"),
            )
        })?;
        Ok(CommandOutcome {
            value,
            position: self.position,
            replayed: self.replayed,
        })
    }
}

/// A registered command: its name (shared, for labels) and handler.
pub(crate) struct Registered {
    pub(crate) name: Arc<str>,
    pub(crate) handler: Arc<dyn DynHandler>,
}

/// Sends commands to their handlers; see the [module docs](self).
///
/// Cheap to clone: clones share the handlers and the middleware.
///
/// ```
/// use orchestrator_core::HandlerError;
/// use orchestrator_cqrs::{CommandBus, Error};
/// use serde_json::{Value, json};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> orchestrator_cqrs::Result<()> {
/// let bus = CommandBus::new();
/// let require_name = |input: &Value| {
///     if input["name"].is_string() { vec![] }
///     else { vec![orchestrator_cqrs::FieldError::new("/name", "is required")] }
/// };
/// bus.register_with_validator("create_user", require_name, |input: Value| async move {
///     Ok::<_, HandlerError>(json!({ "user_id": "USER123", "name": input["name"] }))
/// })?;
///
/// let created = bus.send("create_user", json!({ "name": "John" })).await?;
/// assert_eq!(created.value["user_id"], "USER123");
///
/// let invalid = bus.send("create_user", json!({})).await.unwrap_err();
/// assert_eq!(invalid.field_errors().unwrap()[0].field, "/name");
/// assert!(matches!(bus.send("delete_user", json!({})).await, Err(Error::NoHandler { .. })));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct CommandBus {
    inner: Arc<Inner>,
}

struct Inner {
    handlers: RwLock<HashMap<Arc<str>, Arc<Registered>>>,
    middleware: Vec<Arc<dyn CommandMiddleware>>,
}

impl fmt::Debug for CommandBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandBus")
            .field("commands", &self.command_names())
            .field("middleware", &self.inner.middleware.len())
            .finish()
    }
}

impl Default for CommandBus {
    fn default() -> Self {
        Self::new()
    }
}

/// Builds a [`CommandBus`] with middleware.
#[derive(Default)]
pub struct CommandBusBuilder {
    middleware: Vec<Arc<dyn CommandMiddleware>>,
}

impl fmt::Debug for CommandBusBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandBusBuilder")
            .field("middleware", &self.middleware.len())
            .finish()
    }
}

impl CommandBusBuilder {
    /// Adds a middleware; the first added is the outermost (sees the command first).
    pub fn middleware(mut self, middleware: impl CommandMiddleware) -> Self {
        self.middleware.push(Arc::new(middleware));
        self
    }

    /// The bus.
    pub fn build(self) -> CommandBus {
        CommandBus {
            inner: Arc::new(Inner {
                handlers: RwLock::default(),
                middleware: self.middleware,
            }),
        }
    }
}

impl CommandBus {
    /// A bus without middleware.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder, to add middleware.
    pub fn builder() -> CommandBusBuilder {
        CommandBusBuilder::default()
    }

    // Registration checks everything before inserting; no code panics while holding the
    // lock, so a poisoned lock is safe to use.
    fn handlers(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Arc<str>, Arc<Registered>>> {
        self.inner
            .handlers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(&self, name: &str, handler: Arc<dyn DynHandler>) -> Result<()> {
        check_name(HandlerKind::Command, name)?;
        let mut handlers = self
            .inner
            .handlers
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if handlers.contains_key(name) {
            return Err(Error::AlreadyRegistered {
                kind: HandlerKind::Command,
                name: name.to_owned(),
            });
        }
        let name: Arc<str> = name.into();
        handlers.insert(name.clone(), Arc::new(Registered { name, handler }));
        Ok(())
    }

    /// Registers the handler of the dynamic command `name`: any async function or closure
    /// `Fn(Value) -> Future<Output = Result<Value, E>>`. A name registered twice is
    /// [`Error::AlreadyRegistered`].
    pub fn register(&self, name: &str, handler: impl JsonHandler) -> Result<()> {
        self.insert(
            name,
            Arc::new(Dynamic {
                kind: HandlerKind::Command,
                handler: Arc::new(handler),
                validator: None,
            }),
        )
    }

    /// Registers a dynamic command whose payload `validator` checks first (a closure
    /// returning field errors, or a [`JsonSchemaValidator`](crate::JsonSchemaValidator)).
    pub fn register_with_validator(
        &self,
        name: &str,
        validator: impl Validator,
        handler: impl JsonHandler,
    ) -> Result<()> {
        self.insert(
            name,
            Arc::new(Dynamic {
                kind: HandlerKind::Command,
                handler: Arc::new(handler),
                validator: Some(Arc::new(validator)),
            }),
        )
    }

    /// Registers the handler of the typed command `C` under [`Command::NAME`]. The payload
    /// is decoded into `C` (a payload that does not fit is a validation error) and
    /// [`Command::validate`]d before the handler runs; it can also be sent dynamically.
    pub fn register_command<C, F, Fut, E>(&self, handler: F) -> Result<()>
    where
        C: Command,
        F: Fn(C) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<C::Output, E>> + Send + 'static,
        E: Into<HandlerError> + 'static,
    {
        self.insert(
            C::NAME,
            Arc::new(Typed::new(HandlerKind::Command, handler, C::validate)),
        )
    }

    /// Whether a handler is registered for `name`.
    pub fn has_handler(&self, name: &str) -> bool {
        self.handlers().contains_key(name)
    }

    /// The registered command names, sorted.
    pub fn command_names(&self) -> Vec<String> {
        let mut names: Vec<_> = self.handlers().keys().map(ToString::to_string).collect();
        names.sort();
        names
    }

    /// Sends the dynamic command `name` with `payload`.
    pub async fn send(&self, name: &str, payload: Value) -> Result<CommandOutcome> {
        self.dispatch(CommandRequest::new(name, payload)).await
    }

    /// Sends the typed command `command` and returns its handler's typed result.
    ///
    /// When the bus has no middleware (which sees commands as JSON) and `C`'s handler was
    /// registered with [`register_command`](Self::register_command), the command and its
    /// result go to and from the handler as they are; otherwise through JSON, as
    /// [`dispatch`](Self::dispatch) sends them. Validation, the span and the metrics are the
    /// same either way.
    pub async fn execute<C: Command>(&self, command: C) -> Result<CommandOutcome<C::Output>> {
        if self.inner.middleware.is_empty() {
            let registered = self.handlers().get(C::NAME).cloned();
            if let Some(registered) =
                registered.filter(|r| r.handler.input_type() == Some(TypeId::of::<C>()))
            {
                let run = async {
                    let (output, position) = run_typed(&registered, Box::new(command)).await;
                    let output = output?.downcast::<C::Output>().map_err(|_| {
                        Error::invalid(
                            "command result",
                            format!("the handler of `{}` returned another type", C::NAME),
                        )
                    })?;
                    Ok(CommandOutcome::new(*output, position))
                };
                return self.observed(&registered.name, None, run).await;
            }
        }
        self.dispatch(CommandRequest::from_command(&command)?)
            .await?
            .decode()
    }

    /// Sends a command with its id, correlation id, principal and headers.
    pub async fn dispatch(&self, request: CommandRequest) -> Result<CommandOutcome> {
        let registered = self.handlers().get(&*request.name).cloned();
        let label: Arc<str> = match &registered {
            Some(r) => r.name.clone(),
            // Unknown names are not labels: they would let callers grow the metric set.
            None => Arc::from("unknown"),
        };
        let name = Arc::clone(&request.name);
        let id = request.id.clone();
        let run = async {
            let Some(registered) = registered else {
                return Err(Error::NoHandler {
                    kind: HandlerKind::Command,
                    name: request.name.to_string(),
                });
            };
            Next::new(&self.inner.middleware, &registered)
                .run(request)
                .await
        };
        self.observed_as(&name, id.as_deref(), label, run).await
    }

    /// Runs a command to a registered handler in its span, and records its duration.
    async fn observed<T>(
        &self,
        label: &Arc<str>,
        id: Option<&str>,
        run: impl Future<Output = Result<CommandOutcome<T>>>,
    ) -> Result<CommandOutcome<T>> {
        self.observed_as(label, id, Arc::clone(label), run).await
    }

    /// Runs the command `name` in its span, and records its duration under `label`.
    async fn observed_as<T>(
        &self,
        name: &str,
        id: Option<&str>,
        label: Arc<str>,
        run: impl Future<Output = Result<CommandOutcome<T>>>,
    ) -> Result<CommandOutcome<T>> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "cqrs.command",
            command = %name,
            command_id = id.unwrap_or(""),
        );
        let outcome = run.instrument(span).await;
        let result = match &outcome {
            Ok(o) if o.replayed => "replayed",
            Ok(_) => "ok",
            Err(e) => e.label(),
        };
        metrics::histogram!(telemetry::COMMAND_DURATION, "command" => label, "outcome" => result)
            .record(started.elapsed().as_secs_f64());
        outcome
    }
}

/// Runs the typed handler of `registered` on `input`, in a command scope without an id
/// (the typed path of [`CommandBus::execute`]).
async fn run_typed(
    registered: &Registered,
    input: Box<dyn std::any::Any + Send>,
) -> (Result<Box<dyn std::any::Any + Send>>, Option<u64>) {
    let info = CommandInfo {
        name: registered.name.clone(),
        id: None,
        correlation_id: None,
    };
    context::scoped(info, registered.handler.call_typed(&registered.name, input)).await
}

/// Runs the handler of `registered` for `request`: the end of the middleware chain.
pub(crate) async fn run_handler(
    registered: &Registered,
    request: CommandRequest,
) -> Result<CommandOutcome> {
    let info = CommandInfo {
        name: registered.name.clone(),
        id: request.id,
        correlation_id: request.correlation_id,
    };
    let (value, position) = context::scoped(
        info,
        registered.handler.call(&registered.name, request.payload),
    )
    .await;
    Ok(CommandOutcome::new(value?, position))
}

/// Names must be non-empty and free of control characters.
pub(crate) fn check_name(kind: HandlerKind, name: &str) -> Result<()> {
    if name.trim().is_empty() || name.chars().any(char::is_control) {
        return Err(Error::invalid(
            format!("{kind} name"),
            format!("{name:?} must be non-empty and free of control characters"),
        ));
    }
    Ok(())
}
