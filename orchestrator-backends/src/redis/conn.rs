//! Connections, error mapping, retries and the parsing of stream replies.

use std::future::Future;
use std::time::{Duration, Instant};

use orchestrator_core::{Error, Result, RetryPolicy};
use redis::{RedisError, ServerErrorKind, Value};

use super::config::RedisConfig;

/// The backend name in errors.
pub(crate) const BACKEND: &str = "redis";

/// Whether retrying a command that failed with `error` can help: the connection broke or
/// timed out, or the server is loading its data or failing over.
pub(crate) fn is_temporary(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || matches!(
            error.kind(),
            redis::ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::ReadOnly
            )
        )
}

/// A redis-rs error as the core error.
pub(crate) fn redis_error(error: RedisError) -> Error {
    Error::backend(BACKEND, is_temporary(&error), error)
}

/// A reply that does not have the shape the backend expects.
pub(crate) fn protocol_error(what: impl Into<String>) -> Error {
    Error::backend(
        BACKEND,
        false,
        format!("unexpected reply from Redis: {}", what.into()),
    )
}

/// Whether `error` is Redis's `BUSYGROUP` (the consumer group exists already).
pub(crate) fn is_busy_group(error: &RedisError) -> bool {
    error.code() == Some("BUSYGROUP")
}

/// Whether `error` is Redis's `NOGROUP` (the stream or its consumer group is gone).
pub(crate) fn is_no_group(error: &RedisError) -> bool {
    error.code() == Some("NOGROUP")
}

/// The backoff between retries of a failed command.
pub(crate) fn backoff() -> RetryPolicy {
    RetryPolicy::exponential(u32::MAX, Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(1))
}

/// Runs `op` until it succeeds, fails for good, or temporary failures have lasted
/// [`RedisConfig::with_retry_for`]. `op` gets the attempt number (1 first), so that a retry
/// can first check whether the failed attempt was applied after all.
pub(crate) async fn with_retry<T, F, Fut>(config: &RedisConfig, what: &str, mut op: F) -> Result<T>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = std::result::Result<T, RedisError>>,
{
    let started = Instant::now();
    let policy = backoff();
    let mut attempt = 1u32;
    loop {
        match op(attempt).await {
            Ok(value) => return Ok(value),
            Err(error) if is_temporary(&error) && started.elapsed() < config.retry_for => {
                let delay = policy
                    .delay_after(attempt)
                    .unwrap_or(Duration::from_secs(1));
                tracing::debug!(what, attempt, %error, ?delay, "redis command failed; retrying");
                tokio::time::sleep(delay).await;
                attempt = attempt.saturating_add(1);
            }
            Err(error) => return Err(redis_error(error)),
        }
    }
}

/// The keys of one prefix. Their layout is documented in the module docs.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    pub(crate) fn stream(&self, stream: &str) -> String {
        format!("{}stream:{stream}", self.prefix)
    }

    /// The hash of a stream's event ids (id → stream version).
    pub(crate) fn stream_ids(&self, stream: &str) -> String {
        format!("{}stream-ids:{stream}", self.prefix)
    }

    pub(crate) fn all(&self) -> String {
        format!("{}all", self.prefix)
    }

    pub(crate) fn position(&self) -> String {
        format!("{}position", self.prefix)
    }

    pub(crate) fn topic(&self, topic: &str) -> String {
        format!("{}topic:{topic}", self.prefix)
    }

    /// The topic a topic key names, if it is one.
    pub(crate) fn topic_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(&self.prefix)?.strip_prefix("topic:")
    }

    pub(crate) fn topics(&self) -> String {
        format!("{}topics", self.prefix)
    }

    pub(crate) fn patterns(&self) -> String {
        format!("{}patterns", self.prefix)
    }

    pub(crate) fn retry(&self, group: &str) -> String {
        format!("{}retry:{group}", self.prefix)
    }

    pub(crate) fn delayed(&self, group: &str) -> String {
        format!("{}delayed:{group}", self.prefix)
    }

    /// The set of ephemeral groups (see [`SubscribeOptions::ephemeral`](orchestrator_core::SubscribeOptions)).
    pub(crate) fn ephemeral(&self) -> String {
        format!("{}ephemeral", self.prefix)
    }

    /// The key whose expiry marks an ephemeral group's consumer as gone.
    pub(crate) fn alive(&self, group: &str) -> String {
        format!("{}alive:{group}", self.prefix)
    }

    pub(crate) fn dlq(&self) -> String {
        format!("{}dlq", self.prefix)
    }

    pub(crate) fn dlq_index(&self) -> String {
        format!("{}dlq:index", self.prefix)
    }
}

/// One stream entry: its id and its fields, values as raw bytes (other clients may write
/// anything).
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) id: String,
    pub(crate) fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Entry {
    /// The value of field `name`.
    pub(crate) fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// The value of field `name` as text.
    pub(crate) fn text(&self, name: &str) -> Option<&str> {
        self.field(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The sequence part of the entry id (`<ms>-<seq>`).
    pub(crate) fn sequence(&self) -> Option<u64> {
        self.id.split_once('-')?.1.parse().ok()
    }
}

fn text_of(value: Value) -> Result<String> {
    match value {
        Value::BulkString(b) => String::from_utf8(b).map_err(|_| protocol_error("non-UTF-8 id")),
        Value::SimpleString(s) => Ok(s),
        Value::VerbatimString { text, .. } => Ok(text),
        other => Err(protocol_error(format!("expected a string, got {other:?}"))),
    }
}

fn bytes_of(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

/// Parses one entry (`[id, [field, value, …]]`). An entry deleted while pending reads as
/// `[id, nil]`: it comes back with no fields.
pub(crate) fn parse_entry(value: Value) -> Result<Entry> {
    let Value::Array(parts) = value else {
        return Err(protocol_error("a stream entry is not an array"));
    };
    let mut parts = parts.into_iter();
    let id = text_of(parts.next().unwrap_or(Value::Nil))?;
    let fields = match parts.next() {
        Some(Value::Array(flat)) => {
            let mut fields = Vec::with_capacity(flat.len() / 2);
            let mut flat = flat.into_iter();
            while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                if let (Some(k), Some(v)) = (bytes_of(k), bytes_of(v)) {
                    fields.push((k, v));
                }
            }
            fields
        }
        Some(Value::Map(pairs)) => pairs
            .into_iter()
            .filter_map(|(k, v)| Some((bytes_of(k)?, bytes_of(v)?)))
            .collect(),
        _ => Vec::new(),
    };
    Ok(Entry { id, fields })
}

/// Parses an `XRANGE` reply.
pub(crate) fn parse_entries(value: Value) -> Result<Vec<Entry>> {
    match value {
        Value::Nil => Ok(Vec::new()),
        Value::Array(items) => items.into_iter().map(parse_entry).collect(),
        other => Err(protocol_error(format!("expected entries, got {other:?}"))),
    }
}

/// Parses an `XREAD`/`XREADGROUP` reply into `(stream key, entries)` pairs.
pub(crate) fn parse_read(value: Value) -> Result<Vec<(String, Vec<Entry>)>> {
    let pairs: Vec<(Value, Value)> = match value {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::Array(kv) if kv.len() == 2 => {
                    let mut kv = kv.into_iter();
                    Ok((
                        kv.next().unwrap_or(Value::Nil),
                        kv.next().unwrap_or(Value::Nil),
                    ))
                }
                other => Err(protocol_error(format!(
                    "expected [key, entries], got {other:?}"
                ))),
            })
            .collect::<Result<_>>()?,
        Value::Map(pairs) => pairs,
        other => Err(protocol_error(format!("expected streams, got {other:?}")))?,
    };
    pairs
        .into_iter()
        .map(|(k, v)| Ok((text_of(k)?, parse_entries(v)?)))
        .collect()
}

/// Parses an `XAUTOCLAIM` reply: the next cursor, the claimed entries, and the ids of
/// pending entries that were deleted from the stream.
pub(crate) fn parse_autoclaim(value: Value) -> Result<(String, Vec<Entry>, Vec<String>)> {
    let Value::Array(parts) = value else {
        return Err(protocol_error("XAUTOCLAIM reply is not an array"));
    };
    let mut parts = parts.into_iter();
    let cursor = text_of(parts.next().unwrap_or(Value::Nil))?;
    let entries = parse_entries(parts.next().unwrap_or(Value::Nil))?
        .into_iter()
        .filter(|e| !e.fields.is_empty())
        .collect();
    let deleted = match parts.next() {
        Some(Value::Array(ids)) => ids.into_iter().filter_map(|v| text_of(v).ok()).collect(),
        _ => Vec::new(),
    };
    Ok((cursor, entries, deleted))
}

/// Deletes every key under `prefix` (`SCAN` + `DEL`); returns how many were deleted. For tests
/// and for tearing down an application's data.
pub(crate) async fn delete_prefix(
    manager: &mut redis::aio::ConnectionManager,
    prefix: &str,
) -> Result<usize> {
    if prefix.is_empty() {
        return Err(Error::invalid(
            "key prefix",
            "is empty: deleting by prefix would delete the whole database",
        ));
    }
    let pattern = format!("{}*", escape_glob(prefix));
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(manager)
            .await
            .map_err(redis_error)?;
        if !keys.is_empty() {
            let n: usize = redis::cmd("DEL")
                .arg(&keys)
                .query_async(manager)
                .await
                .map_err(redis_error)?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

fn escape_glob(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_entries_and_reads() {
        let entry = Value::Array(vec![
            bulk("0-3"),
            Value::Array(vec![bulk("type"), bulk("a.b"), bulk("event"), bulk("{}")]),
        ]);
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("k"),
            Value::Array(vec![entry]),
        ])]);
        let read = parse_read(reply).unwrap();
        assert_eq!(read[0].0, "k");
        let e = &read[0].1[0];
        assert_eq!(e.sequence(), Some(3));
        assert_eq!(e.text("type"), Some("a.b"));
        assert_eq!(e.field("event"), Some(&b"{}"[..]));
        assert_eq!(e.field("missing"), None);
        assert!(parse_read(Value::Nil).unwrap().is_empty());
    }

    #[test]
    fn deleted_pending_entries_have_no_fields() {
        let e = parse_entry(Value::Array(vec![bulk("1-1"), Value::Nil])).unwrap();
        assert!(e.fields.is_empty());
    }

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(escape_glob("a*b?[c]"), "a\\*b\\?\\[c\\]");
    }

    #[test]
    fn topic_keys_round_trip() {
        let keys = Keys::new("p:");
        assert_eq!(keys.topic_of(&keys.topic("a.b")), Some("a.b"));
        assert_eq!(keys.topic_of("p:stream:x"), None);
    }
}
