//! The query bus: one handler per query name, a cache invalidated by the read models'
//! projections, and read-your-writes.
//!
//! A query is executed by name with JSON parameters ([`QueryBus::execute`]) — the dynamic
//! form the facade uses — or as a typed [`Query`] ([`QueryBus::query`]). Either way:
//!
//! 1. the handler is looked up ([`Error::NoHandler`] if there is none) and the parameters
//!    validated if it has a [`Validator`];
//! 2. with [`QueryRequest::at_least`] a position (a command's
//!    [`CommandOutcome::position`](crate::CommandOutcome::position)), the query waits until
//!    the read models it reads have seen that position — or fails with
//!    [`Error::NotCaughtUp`] after the timeout — rather than serve data older than the
//!    caller's own write;
//! 3. the cache is consulted, keyed by the query name and the parameters in canonical JSON
//!    (object keys sorted); a result is served while it is younger than the TTL and no event
//!    it depends on has been applied since its handler started (see [`QueryOptions`] for
//!    how a query declares what it depends on, and the `cache` module docs for how);
//! 4. otherwise the handler runs and its result is cached.
//!
//! Each query runs in a span `cqrs.query` (field `query`) and is timed in
//! [`QUERY_DURATION`](crate::telemetry::QUERY_DURATION), with cache hits and misses counted.

pub(crate) mod cache;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use orchestrator_core::{Clock, EventStore, HandlerError, JsonHandler, SystemClock};
use orchestrator_store::projection::{ProjectionRunner, ProjectionState};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::watch;
use tracing::Instrument;

use crate::canonical::canonical_json;
use crate::command::check_name;
use crate::error::{Error, HandlerKind, Result};
use crate::read_model::{Attached, Feed, ReadModelDefinition, ReadModelHandle};
use crate::telemetry;
use crate::validation::{Validator, decode_error};

pub use cache::QueryCacheConfig;
use cache::{Lookup, QueryCache, Tag, Versions};

/// A typed query: a serde type (its parameters) with a stable name and a typed result.
///
/// ```
/// use orchestrator_cqrs::Query;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct GetUser { user_id: String }
///
/// #[derive(Serialize, Deserialize)]
/// struct User { user_id: String, name: String }
///
/// impl Query for GetUser {
///     const NAME: &'static str = "get_user";
///     type Output = Option<User>;
/// }
/// ```
pub trait Query: Serialize + DeserializeOwned + Send + 'static {
    /// The query's name, under which its handler is registered.
    const NAME: &'static str;
    /// What the handler returns.
    type Output: Serialize + DeserializeOwned + Send + 'static;
}

/// How a query's results are cached and what invalidates them.
///
/// By default a result is cached, and any event applied by the read models the query
/// [`reads`](Self::reads) (by any read model, if it names none) invalidates it — always
/// correct, rarely a hit under steady writes. Narrow it down:
///
/// - [`invalidated_by`](Self::invalidated_by): only events of these types;
/// - [`keyed_by_stream`](Self::keyed_by_stream): only events of the stream the parameters
///   name (`get_user {"user_id": "7"}` → `user-7`); with `invalidated_by`, only events of
///   those types in that stream.
#[derive(Clone)]
pub struct QueryOptions {
    cached: bool,
    event_types: Vec<String>,
    stream_of: Option<Arc<dyn Fn(&Value) -> Option<String> + Send + Sync>>,
    reads: Vec<String>,
    validator: Option<Arc<dyn Validator>>,
}

impl fmt::Debug for QueryOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueryOptions")
            .field("cached", &self.cached)
            .field("event_types", &self.event_types)
            .field("keyed_by_stream", &self.stream_of.is_some())
            .field("reads", &self.reads)
            .field("validator", &self.validator.is_some())
            .finish()
    }
}

impl Default for QueryOptions {
    fn default() -> Self {
        Self {
            cached: true,
            event_types: Vec::new(),
            stream_of: None,
            reads: Vec::new(),
            validator: None,
        }
    }
}

impl QueryOptions {
    /// Cached, invalidated by any event of the read models it reads.
    pub fn new() -> Self {
        Self::default()
    }

    /// Never cached.
    pub fn no_cache(mut self) -> Self {
        self.cached = false;
        self
    }

    /// Invalidated only by events of these types.
    pub fn invalidated_by<I, T>(mut self, event_types: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.event_types
            .extend(event_types.into_iter().map(Into::into));
        self
    }

    /// Invalidated only by events of the stream `stream_of` names for the parameters
    /// (`None`: the parameters name no stream, fall back to the other rules).
    pub fn keyed_by_stream(
        mut self,
        stream_of: impl Fn(&Value) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.stream_of = Some(Arc::new(stream_of));
        self
    }

    /// Reads the read model `name`: read-your-writes waits for it, and its events
    /// invalidate the cache (unless narrowed down). May be called for several.
    pub fn reads(mut self, read_model: impl Into<String>) -> Self {
        self.reads.push(read_model.into());
        self
    }

    /// Validates the parameters before the handler runs.
    pub fn validator(mut self, validator: impl Validator) -> Self {
        self.validator = Some(Arc::new(validator));
        self
    }

    /// The tags a result for `params` depends on (see the `cache` module).
    fn tags<'a>(&'a self, stream: Option<&'a str>) -> Vec<Tag<'a>> {
        match (self.event_types.is_empty(), stream) {
            (false, Some(s)) => self.event_types.iter().map(|t| Tag::TypeInStream(t, s)).collect(),
            (false, None) => self.event_types.iter().map(|t| Tag::Type(t)).collect(),
            (true, Some(s)) => vec![Tag::Stream(s)],
            (true, None) if self.reads.is_empty() => vec![Tag::Any],
            (true, None) => self.reads.iter().map(|r| Tag::ReadModel(r)).collect(),
        }
    }
}

/// A query on its way through the bus: name, parameters, and how fresh the answer must be.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct QueryRequest {
    /// The query's name.
    pub name: String,
    /// The parameters.
    pub params: Value,
    /// The global position the read models must have seen first (read-your-writes).
    pub at_least: Option<u64>,
    /// How long to wait for that; the bus's default when `None`.
    pub timeout: Option<Duration>,
    /// Whether the cache may answer (it still stores the result).
    pub use_cache: bool,
}

impl QueryRequest {
    /// The query `name` with `params`.
    pub fn new(name: impl Into<String>, params: Value) -> Self {
        Self {
            name: name.into(),
            params,
            at_least: None,
            timeout: None,
            use_cache: true,
        }
    }

    /// A typed query, serialized.
    pub fn from_query<Q: Query>(query: &Q) -> Result<Self> {
        let params = serde_json::to_value(query).map_err(|e| {
            Error::invalid("query", format!("`{}` does not serialize: {e}", Q::NAME))
        })?;
        Ok(Self::new(Q::NAME, params))
    }

    /// Waits until the read models have seen `position` (`None`: no wait), e.g. a command's
    /// [`CommandOutcome::position`](crate::CommandOutcome::position).
    pub fn at_least(mut self, position: impl Into<Option<u64>>) -> Self {
        self.at_least = position.into();
        self
    }

    /// Waits at most `timeout` for [`at_least`](Self::at_least).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Runs the handler even if a cached result is fresh.
    pub fn bypass_cache(mut self) -> Self {
        self.use_cache = false;
        self
    }
}

#[async_trait]
trait DynQueryHandler: Send + Sync + 'static {
    async fn call(&self, name: &str, params: Value) -> Result<Value>;
}

struct JsonQuery(Arc<dyn JsonHandler>);

#[async_trait]
impl DynQueryHandler for JsonQuery {
    async fn call(&self, name: &str, params: Value) -> Result<Value> {
        self.0
            .call(params)
            .await
            .map_err(|e| Error::from_handler(HandlerKind::Query, name, e))
    }
}

struct TypedQuery<Q, F> {
    handler: F,
    _query: PhantomData<fn(Q)>,
}

#[async_trait]
impl<Q, F, Fut, E> DynQueryHandler for TypedQuery<Q, F>
where
    Q: Query,
    F: Fn(Q) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<Q::Output, E>> + Send + 'static,
    E: Into<HandlerError> + 'static,
{
    async fn call(&self, name: &str, params: Value) -> Result<Value> {
        let query: Q = serde_json::from_value(params)
            .map_err(|e| validation_failed(name, decode_error(&e).into_iter().collect()))?;
        let output = (self.handler)(query)
            .await
            .map_err(|e| Error::from_handler(HandlerKind::Query, name, e.into()))?;
        serde_json::to_value(output).map_err(|e| {
            Error::invalid("query result", format!("`{name}` result does not serialize: {e}"))
        })
    }
}

fn validation_failed(name: &str, errors: Vec<crate::FieldError>) -> Error {
    metrics::counter!(telemetry::VALIDATION_FAILURES, "kind" => "query", "name" => name.to_owned())
        .increment(1);
    Error::Validation {
        kind: HandlerKind::Query,
        name: name.to_owned(),
        errors,
    }
}

struct RegisteredQuery {
    name: Arc<str>,
    handler: Box<dyn DynQueryHandler>,
    options: QueryOptions,
}

/// Executes queries; owns the cache and the read models. See the [module docs](self).
///
/// Cheap to clone: clones share handlers, cache and read models.
#[derive(Clone)]
pub struct QueryBus {
    inner: Arc<Inner>,
}

struct Inner {
    handlers: RwLock<HashMap<Arc<str>, Arc<RegisteredQuery>>>,
    cache: Option<QueryCache>,
    versions: Arc<Versions>,
    read_models: RwLock<BTreeMap<String, ReadModelHandle>>,
    clock: Arc<dyn Clock>,
    wait_timeout: Duration,
}

impl fmt::Debug for QueryBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueryBus")
            .field("queries", &self.query_names())
            .field("cached", &self.inner.cache.is_some())
            .field("read_models", &self.read_models().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for QueryBus {
    fn default() -> Self {
        Self::new()
    }
}

/// Builds a [`QueryBus`].
#[derive(Debug)]
pub struct QueryBusBuilder {
    cache: Option<QueryCacheConfig>,
    clock: Arc<dyn Clock>,
    wait_timeout: Duration,
}

impl QueryBusBuilder {
    /// Caches results per `config` (the default: [`QueryCacheConfig::default`]).
    pub fn cache(mut self, config: QueryCacheConfig) -> Self {
        self.cache = Some(config);
        self
    }

    /// Caches nothing.
    pub fn without_cache(mut self) -> Self {
        self.cache = None;
        self
    }

    /// Measures cache ages and read-your-writes timeouts on `clock`.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// How long a read-your-writes query waits by default (5 s unless set).
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self
    }

    /// The bus.
    pub fn build(self) -> QueryBus {
        let versions = Arc::new(Versions::default());
        let cache = self
            .cache
            .map(|config| QueryCache::new(config, self.clock.clone(), versions.clone()));
        QueryBus {
            inner: Arc::new(Inner {
                handlers: RwLock::default(),
                cache,
                versions,
                read_models: RwLock::default(),
                clock: self.clock,
                wait_timeout: self.wait_timeout,
            }),
        }
    }
}

impl QueryBus {
    /// A bus with the default cache (10,000 results, 30 s) on the system clock.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder.
    pub fn builder() -> QueryBusBuilder {
        QueryBusBuilder {
            cache: Some(QueryCacheConfig::default()),
            clock: Arc::new(SystemClock),
            wait_timeout: Duration::from_secs(5),
        }
    }

    // Registration checks everything before inserting; no code panics while holding these
    // locks, so a poisoned lock is safe to use.
    fn handlers(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Arc<str>, Arc<RegisteredQuery>>> {
        self.inner
            .handlers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn read_models(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, ReadModelHandle>> {
        self.inner
            .read_models
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(&self, name: &str, options: QueryOptions, handler: Box<dyn DynQueryHandler>) -> Result<()> {
        check_name(HandlerKind::Query, name)?;
        let mut handlers = self
            .inner
            .handlers
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if handlers.contains_key(name) {
            return Err(Error::AlreadyRegistered {
                kind: HandlerKind::Query,
                name: name.to_owned(),
            });
        }
        let name: Arc<str> = name.into();
        let registered = RegisteredQuery {
            name: name.clone(),
            handler,
            options,
        };
        handlers.insert(name, Arc::new(registered));
        Ok(())
    }

    /// Registers the handler of the dynamic query `name` with the default [`QueryOptions`]:
    /// any async function or closure `Fn(Value) -> Future<Output = Result<Value, E>>`.
    pub fn register(&self, name: &str, handler: impl JsonHandler) -> Result<()> {
        self.register_with(name, QueryOptions::default(), handler)
    }

    /// Registers a dynamic query with `options`.
    pub fn register_with(&self, name: &str, options: QueryOptions, handler: impl JsonHandler) -> Result<()> {
        self.insert(name, options, Box::new(JsonQuery(Arc::new(handler))))
    }

    /// Registers the handler of the typed query `Q` under [`Query::NAME`] with `options`;
    /// it can also be executed dynamically.
    pub fn register_query<Q, F, Fut, E>(&self, options: QueryOptions, handler: F) -> Result<()>
    where
        Q: Query,
        F: Fn(Q) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Q::Output, E>> + Send + 'static,
        E: Into<HandlerError> + 'static,
    {
        let handler = TypedQuery {
            handler,
            _query: PhantomData,
        };
        self.insert(Q::NAME, options, Box::new(handler))
    }

    /// The registered query names, sorted.
    pub fn query_names(&self) -> Vec<String> {
        let mut names: Vec<_> = self.handlers().keys().map(ToString::to_string).collect();
        names.sort();
        names
    }

    /// Executes the dynamic query `name` with `params`.
    pub async fn execute(&self, name: &str, params: Value) -> Result<Value> {
        self.execute_request(QueryRequest::new(name, params)).await
    }

    /// Executes the typed query `query` and decodes its result.
    pub async fn query<Q: Query>(&self, query: Q) -> Result<Q::Output> {
        self.query_after(query, None).await
    }

    /// Executes the typed query `query` once the read models have seen `position`.
    pub async fn query_after<Q: Query>(&self, query: Q, position: impl Into<Option<u64>>) -> Result<Q::Output> {
        let request = QueryRequest::from_query(&query)?.at_least(position);
        let value = self.execute_request(request).await?;
        serde_json::from_value(value).map_err(|e| {
            Error::invalid("query result", format!("`{}` result does not fit: {e}", Q::NAME))
        })
    }

    /// Executes a query with its freshness requirements.
    pub async fn execute_request(&self, request: QueryRequest) -> Result<Value> {
        let started = Instant::now();
        let Some(registered) = self.handlers().get(request.name.as_str()).cloned() else {
            return Err(Error::NoHandler {
                kind: HandlerKind::Query,
                name: request.name,
            });
        };
        let span = tracing::info_span!("cqrs.query", query = %registered.name);
        let (result, cache) = self.run(&registered, request).instrument(span).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.label(),
        };
        metrics::histogram!(
            telemetry::QUERY_DURATION,
            "query" => registered.name.clone(),
            "cache" => cache,
            "outcome" => outcome
        )
        .record(started.elapsed().as_secs_f64());
        result
    }

    /// Runs one query; returns its result and what the cache did (`hit`, `miss`, `off`).
    async fn run(&self, registered: &RegisteredQuery, request: QueryRequest) -> (Result<Value>, &'static str) {
        let options = &registered.options;
        if let Some(validator) = &options.validator {
            let errors = validator.validate(&request.params);
            if !errors.is_empty() {
                return (Err(validation_failed(&registered.name, errors)), "off");
            }
        }
        if let Some(position) = request.at_least {
            let timeout = request.timeout.unwrap_or(self.inner.wait_timeout);
            if let Err(e) = self.wait_for_position(&options.reads, position, timeout).await {
                return (Err(e), "off");
            }
        }
        let cache = self.inner.cache.as_ref().filter(|_| options.cached);
        let Some(cache) = cache else {
            return (registered.handler.call(&registered.name, request.params).await, "off");
        };
        let key = format!("{}\u{0}{}", registered.name, canonical_json(&request.params));
        if request.use_cache {
            match cache.get(&key).await {
                Lookup::Hit(value) => {
                    metrics::counter!(telemetry::CACHE_HITS, "query" => registered.name.clone()).increment(1);
                    return (Ok(value), "hit");
                }
                Lookup::Miss(reason) => {
                    metrics::counter!(telemetry::CACHE_MISSES, "query" => registered.name.clone(), "reason" => reason)
                        .increment(1);
                }
            }
        }
        let stream = options.stream_of.as_ref().and_then(|f| f(&request.params));
        // Before the handler reads anything: see the `cache` module docs.
        let seen = self.inner.versions.seen(&options.tags(stream.as_deref()));
        let result = registered.handler.call(&registered.name, request.params).await;
        if let Ok(value) = &result {
            cache.insert(key, value.clone(), seen).await;
        }
        (result, "miss")
    }

    /// Waits until the read models named in `reads` (all attached ones if empty) have seen
    /// `position`, for at most `timeout` on the bus's clock.
    pub async fn wait_for_position(&self, reads: &[String], position: u64, timeout: Duration) -> Result<()> {
        let models: Vec<ReadModelHandle> = {
            let all = self.read_models();
            if reads.is_empty() {
                all.values().cloned().collect()
            } else {
                let mut models = Vec::with_capacity(reads.len());
                for name in reads {
                    let model = all.get(name).cloned().ok_or_else(|| {
                        Error::invalid("read model", format!("`{name}` is not attached to this query bus"))
                    })?;
                    models.push(model);
                }
                models
            }
        };
        let started = Instant::now();
        let mut deadline = self.inner.clock.sleep(timeout);
        for model in models {
            if model.position() >= position {
                continue;
            }
            let not_caught_up = |state: Option<String>| Error::NotCaughtUp {
                read_model: model.name().to_owned(),
                reached: model.position(),
                wanted: position,
                waited: started.elapsed(),
                state,
            };
            tokio::select! {
                reached = model.attached.reach(position) => {
                    reached.map_err(|state| not_caught_up(Some(state)))?;
                }
                () = &mut deadline => {
                    let stuck = model
                        .status()
                        .filter(|s| !matches!(s.state, ProjectionState::Live | ProjectionState::CatchingUp))
                        .map(|s| crate::read_model::describe(&s));
                    return Err(not_caught_up(stuck));
                }
            }
        }
        Ok(())
    }

    /// Attaches a read model fed from `store`: starts its projection and waits until it has
    /// loaded where to resume. Its events invalidate this bus's cache, and read-your-writes
    /// queries wait for it. A name attached twice is [`Error::AlreadyRegistered`].
    pub async fn attach_read_model(
        &self,
        store: Arc<dyn EventStore>,
        definition: ReadModelDefinition,
    ) -> Result<ReadModelHandle> {
        let ReadModelDefinition {
            name,
            model,
            storage,
            filter,
            options,
        } = definition;
        check_name(HandlerKind::Query, &name)?;
        if self.read_models().contains_key(&name) {
            return Err(Error::invalid("read model", format!("`{name}` is already attached")));
        }
        let attached = Arc::new(Attached {
            name: name.as_str().into(),
            storage,
            position: watch::Sender::new(0),
            projection: tokio::sync::RwLock::new(None),
        });
        let feed = Feed {
            attached: attached.clone(),
            model,
            filter,
            versions: self.inner.versions.clone(),
        };
        let options = options.filter(orchestrator_core::EventFilter::all());
        let handle = ProjectionRunner::new(store, name.clone(), Arc::new(feed))
            .with_options(options)
            .spawn();
        let status = handle.wait_for(|s| s.state != ProjectionState::Starting).await;
        attached.position.send_modify(|p| *p = (*p).max(status.position));
        *attached.projection.write().await = Some(handle);
        let model = ReadModelHandle { attached };
        let mut read_models = self
            .inner
            .read_models
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if read_models.contains_key(&name) {
            drop(read_models);
            model.stop().await;
            return Err(Error::invalid("read model", format!("`{name}` is already attached")));
        }
        read_models.insert(name, model.clone());
        Ok(model)
    }

    /// The attached read model `name`.
    pub fn read_model(&self, name: &str) -> Option<ReadModelHandle> {
        self.read_models().get(name).cloned()
    }

    /// How many results the cache holds (after pending evictions); 0 without a cache.
    pub async fn cached_results(&self) -> u64 {
        match &self.inner.cache {
            Some(cache) => cache.entry_count().await,
            None => 0,
        }
    }

    /// Forgets every cached result.
    pub fn clear_cache(&self) {
        if let Some(cache) = &self.inner.cache {
            cache.clear();
        }
    }

    /// Stops every read model's projection.
    pub async fn shutdown(&self) {
        let models: Vec<_> = self.read_models().values().cloned().collect();
        for model in models {
            model.stop().await;
        }
    }
}
