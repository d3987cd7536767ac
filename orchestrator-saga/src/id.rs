//! Saga ids and the names of their log streams.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The prefix of every saga-log stream: saga `id` logs to stream `saga-<id>`.
pub const STREAM_PREFIX: &str = "saga-";

/// One saga instance's id: a UUIDv7, so ids sort by start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SagaId(Uuid);

impl SagaId {
    /// A fresh id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id as a UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// The stream the saga's log is kept in: `saga-<id>`.
    pub fn stream(&self) -> String {
        format!("{STREAM_PREFIX}{}", self.0)
    }

    /// The saga whose log `stream` is, if it is a saga-log stream.
    pub fn from_stream(stream: &str) -> Option<Self> {
        stream
            .strip_prefix(STREAM_PREFIX)
            .and_then(|id| Uuid::parse_str(id).ok())
            .map(Self)
    }
}

impl Default for SagaId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<Uuid> for SagaId {
    fn from(id: Uuid) -> Self {
        Self(id)
    }
}

impl fmt::Display for SagaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for SagaId {
    type Err = orchestrator_core::Error;

    /// Parses a UUID (`0191…`) or a saga-log stream name (`saga-0191…`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let id = s.strip_prefix(STREAM_PREFIX).unwrap_or(s);
        Uuid::parse_str(id)
            .map(Self)
            .map_err(|e| orchestrator_core::Error::invalid("saga id", format!("`{s}`: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_streams_and_strings() {
        let id = SagaId::new();
        assert_eq!(SagaId::from_stream(&id.stream()), Some(id));
        assert_eq!(id.to_string().parse::<SagaId>().unwrap(), id);
        assert_eq!(id.stream().parse::<SagaId>().unwrap(), id);
        assert_eq!(SagaId::from_stream("order-1"), None);
        assert!("nope".parse::<SagaId>().is_err());
    }
}
