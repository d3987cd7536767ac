//! The query bus: one handler per query name, a cache invalidated by the read models'
//! projections, and read-your-writes.
//!
//! A query is executed by name with JSON parameters ([`QueryBus::execute`]) — the dynamic
//! form the facade uses — or as a typed [`Query`] ([`QueryBus::query`]). Either way:
//!
//! 1. the handler is looked up ([`Error::NoHandler`] if there is none) and the parameters
//!    validated if it has a [`Validator`](crate::Validator);
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
//!
//! A read model of users, a cached `get_user` that only events of that user's stream
//! invalidate, and read-your-writes after each write:
//!
//! ```
//! use std::sync::Arc;
//! use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion, HandlerError};
//! use orchestrator_cqrs::{
//!     CommandBus, PositionTrackingStore, QueryBus, QueryOptions, QueryRequest,
//!     ReadModelDefinition, ReadModelStore,
//! };
//! use orchestrator_store::InMemoryEventStore;
//! use serde_json::{Value, json};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> orchestrator_cqrs::Result<()> {
//! let store: Arc<dyn EventStore> = Arc::new(PositionTrackingStore::new(InMemoryEventStore::new()));
//! let (commands, queries) = (CommandBus::new(), QueryBus::new());
//!
//! // The read model: one document per user, from the user events.
//! let project = |event: EventEnvelope, users: Arc<dyn ReadModelStore>| async move {
//!     let user: Value = event.data()?;
//!     let id = user["user_id"].as_str().unwrap_or_default().to_owned();
//!     users.put(&id, user).await?;
//!     Ok::<_, HandlerError>(())
//! };
//! let users = queries
//!     .attach_read_model(
//!         store.clone(),
//!         ReadModelDefinition::new("users", project).event_types(["user.created", "user.renamed"]),
//!     )
//!     .await?;
//!
//! // The write side: commands append user events.
//! let events = store.clone();
//! commands.register("save_user", move |user: Value| {
//!     let events = events.clone();
//!     async move {
//!         let stream = format!("user-{}", user["user_id"].as_str().unwrap_or_default());
//!         let kind = match events.stream_version(&stream).await? {
//!             None => "user.created",
//!             Some(_) => "user.renamed",
//!         };
//!         let event = EventEnvelope::new(kind, &user)?;
//!         events.append(&stream, ExpectedVersion::Any, vec![event]).await?;
//!         Ok::<_, HandlerError>(json!({ "user_id": user["user_id"] }))
//!     }
//! })?;
//!
//! // The read side: get_user reads the documents; only its own user's events invalidate it.
//! let documents = users.storage().clone();
//! let get_user = move |params: Value| {
//!     let documents = documents.clone();
//!     async move {
//!         let user = documents.get(params["user_id"].as_str().unwrap_or_default()).await?;
//!         Ok::<_, HandlerError>(user.unwrap_or(Value::Null))
//!     }
//! };
//! let options = QueryOptions::new()
//!     .reads("users")
//!     .keyed_by_stream(|params| Some(format!("user-{}", params["user_id"].as_str()?)));
//! queries.register_with("get_user", options, get_user)?;
//!
//! let get_7 = || QueryRequest::new("get_user", json!({ "user_id": "7" }));
//! let saved = commands.send("save_user", json!({ "user_id": "7", "name": "John" })).await?;
//! let user = queries.execute_request(get_7().at_least(saved.position)).await?;
//! assert_eq!(user["name"], "John"); // the projection had caught up first
//!
//! let renamed = commands.send("save_user", json!({ "user_id": "7", "name": "Johnny" })).await?;
//! let user = queries.execute_request(get_7().at_least(renamed.position)).await?;
//! assert_eq!(user["name"], "Johnny"); // the cached "John" was invalidated
//! # queries.shutdown().await;
//! # Ok(())
//! # }
//! ```

pub(crate) mod cache;
mod options;
mod read_models;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use orchestrator_core::{Clock, HandlerError, JsonHandler, SystemClock};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::Instrument;

use crate::canonical::canonical_json;
use crate::command::check_name;
use crate::error::{Error, HandlerKind, Result};
use crate::handler::{DynHandler, Dynamic, Typed, check};
use crate::read_model::ReadModelHandle;
use crate::telemetry;

pub use cache::QueryCacheConfig;
use cache::{Lookup, QueryCache, Versions};
pub use options::{QueryOptions, QueryRequest};

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

struct RegisteredQuery {
    name: Arc<str>,
    handler: Box<dyn DynHandler>,
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
            .field(
                "read_models",
                &self.read_models().keys().collect::<Vec<_>>(),
            )
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

    fn insert(
        &self,
        name: &str,
        options: QueryOptions,
        handler: Box<dyn DynHandler>,
    ) -> Result<()> {
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
    pub fn register_with(
        &self,
        name: &str,
        options: QueryOptions,
        handler: impl JsonHandler,
    ) -> Result<()> {
        let handler = Dynamic {
            kind: HandlerKind::Query,
            handler: Arc::new(handler),
            validator: None,
        };
        self.insert(name, options, Box::new(handler))
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
        let handler = Typed::new(HandlerKind::Query, handler, |_: &Q| Vec::new());
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
    pub async fn query_after<Q: Query>(
        &self,
        query: Q,
        position: impl Into<Option<u64>>,
    ) -> Result<Q::Output> {
        let request = QueryRequest::from_query(&query)?.at_least(position);
        let value = self.execute_request(request).await?;
        serde_json::from_value(value).map_err(|e| {
            Error::invalid(
                "query result",
                format!("`{}` result does not fit: {e}", Q::NAME),
            )
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
    async fn run(
        &self,
        registered: &RegisteredQuery,
        request: QueryRequest,
    ) -> (Result<Value>, &'static str) {
        let options = &registered.options;
        if let Some(validator) = &options.validator
            && let Err(e) = check(
                HandlerKind::Query,
                &registered.name,
                validator.validate(&request.params),
            )
        {
            return (Err(e), "off");
        }
        if let Some(position) = request.at_least {
            let timeout = request.timeout.unwrap_or(self.inner.wait_timeout);
            if let Err(e) = self
                .wait_for_position(&options.reads, position, timeout)
                .await
            {
                return (Err(e), "off");
            }
        }
        let cache = self.inner.cache.as_ref().filter(|_| options.cached);
        let Some(cache) = cache else {
            return (
                registered
                    .handler
                    .call(&registered.name, request.params)
                    .await,
                "off",
            );
        };
        let key = format!(
            "{}\u{0}{}",
            registered.name,
            canonical_json(&request.params)
        );
        if request.use_cache {
            match cache.get(&key).await {
                Lookup::Hit(value) => {
                    metrics::counter!(telemetry::CACHE_HITS, "query" => registered.name.clone())
                        .increment(1);
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
        let result = registered
            .handler
            .call(&registered.name, request.params)
            .await;
        if let Ok(value) = &result {
            cache.insert(key, value.clone(), seen).await;
        }
        (result, "miss")
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
}
