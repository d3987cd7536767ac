//! Trimming topic streams of what every consumer group has acknowledged (see the
//! [module docs](super#trimming-topic-streams)).

use std::collections::HashMap;
use std::time::Instant;

use orchestrator_core::Result;
use orchestrator_core::transport::validate_topic;

use super::conn::{protocol_error, with_retry};
use super::scripts;
use super::transport::{RedisTransport, lock};

/// What one trim of a topic stream did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicTrim {
    /// How many entries were removed.
    pub removed: u64,
    /// How many entries the stream holds now.
    pub remaining: u64,
    /// The cut: every entry older than this id was removed. The oldest entry a group still
    /// needs (or, with no group, the retention age as an id); empty when the stream does not
    /// exist.
    pub cut: String,
}

/// When each topic was last trimmed by this process (or first published to).
#[derive(Debug, Default)]
pub(crate) struct TrimClock {
    last: std::sync::Mutex<HashMap<String, Instant>>,
}

impl TrimClock {
    /// Whether `topic` is due for a trim at `now`; if so, counts it as trimmed now. The first
    /// publish to a topic starts its clock: a process that publishes once trims nothing.
    fn due(&self, topic: &str, now: Instant, interval: std::time::Duration) -> bool {
        let mut last = lock(&self.last);
        match last.get_mut(topic) {
            Some(at) if now.saturating_duration_since(*at) >= interval => {
                *at = now;
                true
            }
            Some(_) => false,
            None => {
                last.insert(topic.to_owned(), now);
                interval.is_zero()
            }
        }
    }

    /// Forgets every topic (after [`RedisTransport::delete_all`]).
    pub(crate) fn clear(&self) {
        lock(&self.last).clear();
    }
}

impl RedisTransport {
    /// Trims the stream of `topic` now, whatever the trim interval: removes the entries every
    /// consumer group of the topic has acknowledged and that are older than
    /// [`RedisConfig::with_topic_retention`](super::RedisConfig::with_topic_retention). An
    /// entry that some group has not read yet, or holds unacknowledged, is never removed.
    ///
    /// Publishing trims on its own (every [`RedisConfig::with_topic_trim_interval`](
    /// super::RedisConfig::with_topic_trim_interval)); this is for operators and tests.
    pub async fn trim_topic(&self, topic: &str) -> Result<TopicTrim> {
        validate_topic(topic)?;
        let shared = &self.shared;
        let key = shared.keys.topic(topic);
        let retention =
            u64::try_from(shared.config.topic_retention.as_millis()).unwrap_or(u64::MAX);
        let (removed, remaining, cut): (i64, i64, String) =
            with_retry(&shared.config, "trim topic", |_| {
                let mut manager = shared.manager.clone();
                let mut invocation = scripts::TRIM_TOPIC.prepare_invoke();
                invocation.key(&key).arg(retention);
                async move { invocation.invoke_async(&mut manager).await }
            })
            .await?;
        let count =
            |n: i64| u64::try_from(n).map_err(|_| protocol_error(format!("a negative count {n}")));
        let trim = TopicTrim {
            removed: count(removed)?,
            remaining: count(remaining)?,
            cut,
        };
        tracing::debug!(topic, removed = trim.removed, remaining = trim.remaining, cut = %trim.cut, "trimmed a topic stream");
        Ok(trim)
    }

    /// Trims every registered topic's stream ([`trim_topic`](Self::trim_topic)); returns how
    /// many entries were removed in all.
    pub async fn trim_topics(&self) -> Result<u64> {
        let mut removed = 0u64;
        for topic in self.topics().await? {
            if validate_topic(&topic).is_err() {
                // Registered by another client under a name this crate would refuse.
                continue;
            }
            removed = removed.saturating_add(self.trim_topic(&topic).await?.removed);
        }
        Ok(removed)
    }

    /// After a publish to `topic`: trims it if its trim interval has passed. A failed trim is
    /// logged, not returned: the publish itself succeeded, and the next one tries again.
    pub(crate) async fn trim_if_due(&self, topic: &str) {
        let Some(interval) = self.shared.config.topic_trim_interval else {
            return;
        };
        if !self.shared.trims.due(topic, Instant::now(), interval) {
            return;
        }
        if let Err(error) = self.trim_topic(topic).await {
            tracing::warn!(topic, %error, "trimming a topic stream failed; the next publish retries");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_topic_is_due_once_per_interval_from_its_first_publish() {
        let clock = TrimClock::default();
        let start = Instant::now();
        let second = Duration::from_secs(1);
        assert!(
            !clock.due("t", start, second),
            "the first publish starts the clock"
        );
        assert!(!clock.due("t", start + second / 2, second));
        assert!(clock.due("t", start + second, second));
        assert!(!clock.due("t", start + second * 3 / 2, second));
        assert!(clock.due("t", start + second * 2, second));
        assert!(!clock.due("u", start + second * 2, second), "per topic");
        assert!(clock.due("v", start, Duration::ZERO), "zero: every publish");
        assert!(clock.due("v", start, Duration::ZERO));
    }
}
