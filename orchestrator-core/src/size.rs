//! [`MaxEventSize`]: the one limit on how large an event may be, enforced before anything is
//! written and before anything read is decoded.
//!
//! An event's size is the length of its CloudEvents JSON encoding
//! ([`cloudevents::encoded_len`]) — what every broker carries, and never less than the binary
//! record the file store writes — so one event is accepted or refused alike by every store
//! and transport. A store measures the event as it will be stored (with its stream id and
//! position, [`cloudevents::stored_encoded_len`]), so that what it accepts its relay can
//! publish under the same limit.
//!
//! ```
//! use orchestrator_core::{Error, EventEnvelope, MaxEventSize};
//!
//! let limit = MaxEventSize::new(1024)?;
//! let small = EventEnvelope::new("doc.saved", &serde_json::json!({"n": 1}))?;
//! limit.check(&small)?;
//! let large = EventEnvelope::new("doc.saved", &"x".repeat(2000))?;
//! assert!(matches!(limit.check(&large), Err(Error::TooLarge { limit: 1024, .. })));
//! # Ok::<(), orchestrator_core::Error>(())
//! ```

use crate::cloudevents;
use crate::codec::Bincode;
use crate::envelope::EventEnvelope;
use crate::error::{Error, Result};

/// The largest event a store or transport accepts, in bytes of its CloudEvents JSON
/// encoding; see the [module docs](self).
///
/// The default, [`MaxEventSize::DEFAULT`], is 900 KiB (921,600 bytes): under the smallest
/// default limit of the brokers orchestrator runs on — Kafka's 1,000,000-byte producer
/// `message.max.bytes` (the broker's `message.max.bytes` is 1,048,588) — with about 78 KB
/// left for what a broker adds to the event (Kafka's record key, headers and batch framing).
/// RabbitMQ's default is 16 MiB and Redis has none, so the default is safe on all of them.
/// Raise it (up to [`MaxEventSize::MAX`]) only as far as your broker is configured to accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MaxEventSize(usize);

impl MaxEventSize {
    /// 900 KiB; see the [type docs](Self) for why.
    pub const DEFAULT: Self = Self(900 * 1024);

    /// The largest limit that can be set: 64 MiB, what the binary codec reads back
    /// ([`Bincode::MAX_LEN`]), so that every store can read back what it accepted.
    pub const MAX: Self = Self(Bincode::MAX_LEN);

    /// A limit of `bytes`; [`Error::InvalidInput`] for 0 or more than [`MAX`](Self::MAX).
    pub fn new(bytes: usize) -> Result<Self> {
        if bytes == 0 || bytes > Self::MAX.0 {
            return Err(Error::invalid(
                "maximum event size",
                format!(
                    "{bytes} bytes; give between 1 and {} bytes (64 MiB)",
                    Self::MAX.0
                ),
            ));
        }
        Ok(Self(bytes))
    }

    /// The limit in bytes.
    pub fn bytes(self) -> usize {
        self.0
    }

    /// Refuses an encoded size over the limit with [`Error::TooLarge`].
    pub fn check_len(self, size: usize) -> Result<()> {
        if size > self.0 {
            return Err(Error::TooLarge {
                size,
                limit: self.0,
            });
        }
        Ok(())
    }

    /// Refuses `event` with [`Error::TooLarge`] if its encoding is over the limit (what a
    /// transport checks before publishing).
    pub fn check(self, event: &EventEnvelope) -> Result<()> {
        if cloudevents::wire_len_bound(event, None) <= self.0 {
            return Ok(());
        }
        self.check_len(cloudevents::encoded_len(event))
    }

    /// Refuses a batch to append to `stream` with [`Error::TooLarge`] if one of its events,
    /// as it will be stored there, is over the limit (what a store checks before writing
    /// anything of the batch).
    pub fn check_append(self, stream: &str, events: &[EventEnvelope]) -> Result<()> {
        events.iter().try_for_each(|event| {
            if cloudevents::wire_len_bound(event, Some(stream)) <= self.0 {
                return Ok(());
            }
            self.check_len(cloudevents::stored_encoded_len(event, stream))
        })
    }

    /// Refuses bytes received from a broker or read from disk with an [`Error::Decode`]
    /// naming their size and the limit, before decoding them (a transport dead-letters such a
    /// message).
    pub fn check_received(self, bytes: &[u8]) -> Result<()> {
        if bytes.len() > self.0 {
            return Err(Error::decode(
                "$",
                format!(
                    "{} bytes, over the maximum event size of {} bytes",
                    bytes.len(),
                    self.0
                ),
            ));
        }
        Ok(())
    }

    /// Decodes CloudEvents JSON received from a broker, refusing it first (as
    /// [`check_received`](Self::check_received)) if it is over the limit.
    pub fn decode(self, bytes: &[u8]) -> Result<EventEnvelope> {
        self.check_received(bytes)?;
        cloudevents::decode(bytes)
    }
}

impl Default for MaxEventSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl std::fmt::Display for MaxEventSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::StoredPosition;

    fn events() -> Vec<EventEnvelope> {
        let json = EventEnvelope::new("a.b", &serde_json::json!({"k": "v\"\n", "n": [1, 2]}))
            .unwrap()
            .with_correlation_id("c-1")
            .with_header("tenant", "t\u{e9}")
            .unwrap();
        let mut out = vec![json.clone()];
        for n in 0..5 {
            out.push(
                EventEnvelope::from_bytes("a.b", "application/octet-stream", vec![7_u8; n])
                    .unwrap(),
            );
        }
        out.push(EventEnvelope::from_bytes("a.b", "application/octet-stream", Vec::new()).unwrap());
        out.push(json.with_position(
            "s",
            StoredPosition {
                stream_version: 3,
                global_position: 9,
            },
        ));
        out
    }

    #[test]
    fn encoded_len_is_the_length_of_the_encoding() {
        for event in events() {
            assert_eq!(
                cloudevents::encoded_len(&event),
                cloudevents::encode(&event).unwrap().len(),
                "{event:?}"
            );
        }
    }

    #[test]
    fn the_stored_length_bounds_the_event_as_stored() {
        for event in events() {
            let stored = event.clone().with_position(
                "stream-\u{1}\"",
                StoredPosition {
                    stream_version: u64::MAX,
                    global_position: u64::MAX,
                },
            );
            assert_eq!(
                cloudevents::stored_encoded_len(&event, "stream-\u{1}\""),
                cloudevents::encode(&stored).unwrap().len()
            );
        }
    }

    #[test]
    fn the_quick_bound_is_an_upper_bound() {
        let escaped = EventEnvelope::new("a.b", &1)
            .unwrap()
            .with_correlation_id("\u{1}\u{1f}\"\\".repeat(50))
            .with_header("k", "\u{2}".repeat(100))
            .unwrap();
        for event in events().into_iter().chain([escaped]) {
            assert!(cloudevents::wire_len_bound(&event, None) >= cloudevents::encoded_len(&event));
            assert!(
                cloudevents::wire_len_bound(&event, Some("s\u{1}"))
                    >= cloudevents::stored_encoded_len(&event, "s\u{1}")
            );
        }
    }

    #[test]
    fn limits_are_checked() {
        let limit = MaxEventSize::new(100).unwrap();
        assert!(limit.check_len(100).is_ok());
        match limit.check_len(101) {
            Err(Error::TooLarge { size, limit }) => assert_eq!((size, limit), (101, 100)),
            other => panic!("{other:?}"),
        }
        let err = limit.check_len(101).unwrap_err().to_string();
        assert!(
            err.contains("101 bytes") && err.contains("100 bytes"),
            "{err}"
        );
        assert!(matches!(
            MaxEventSize::new(0),
            Err(Error::InvalidInput { .. })
        ));
        assert!(MaxEventSize::new(MaxEventSize::MAX.bytes() + 1).is_err());
        assert_eq!(MaxEventSize::default(), MaxEventSize::DEFAULT);
    }

    #[test]
    fn a_batch_with_one_event_over_is_refused() {
        let limit = MaxEventSize::new(1024).unwrap();
        let small = EventEnvelope::new("a.b", &1).unwrap();
        let large = EventEnvelope::new("a.b", &"x".repeat(1024)).unwrap();
        assert!(
            limit
                .check_append("s", &[small.clone(), small.clone()])
                .is_ok()
        );
        assert!(matches!(
            limit.check_append("s", &[small, large]),
            Err(Error::TooLarge { limit: 1024, .. })
        ));
    }

    #[test]
    fn received_bytes_over_the_limit_are_a_decode_error() {
        let limit = MaxEventSize::new(64).unwrap();
        let wire =
            cloudevents::encode(&EventEnvelope::new("a.b", &"x".repeat(100)).unwrap()).unwrap();
        let err = limit.decode(&wire).unwrap_err();
        assert_eq!(err.decode_field(), Some("$"), "{err}");
        assert!(err.to_string().contains("maximum event size"), "{err}");
    }
}
