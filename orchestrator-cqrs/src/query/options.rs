//! What a query asks for: [`QueryOptions`] at registration, [`QueryRequest`] per call.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::Query;
use super::cache::Tag;
use crate::error::{Error, Result};
use crate::validation::Validator;

/// Names the stream a query's parameters are about.
type StreamOf = Arc<dyn Fn(&Value) -> Option<String> + Send + Sync>;

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
    pub(super) cached: bool,
    pub(super) event_types: Vec<String>,
    pub(super) stream_of: Option<StreamOf>,
    pub(super) reads: Vec<String>,
    pub(super) validator: Option<Arc<dyn Validator>>,
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
    pub(crate) fn tags<'a>(&'a self, stream: Option<&'a str>) -> Vec<Tag<'a>> {
        match (self.event_types.is_empty(), stream) {
            (false, Some(s)) => self
                .event_types
                .iter()
                .map(|t| Tag::TypeInStream(t, s))
                .collect(),
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
