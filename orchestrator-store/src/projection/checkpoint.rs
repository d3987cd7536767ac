//! Checkpoints as events: the last event of `$checkpoint-<name>` holds the position.

use orchestrator_core::{
    Error, EventEnvelope, EventFilter, EventStore, ExpectedVersion, ReadAll, Result,
};
use serde::{Deserialize, Serialize};

use crate::replay::SYSTEM_STREAM_PREFIX;

/// The type of checkpoint events.
pub const CHECKPOINT_EVENT_TYPE: &str = "orchestrator.projection.checkpoint";

#[derive(Serialize, Deserialize)]
struct CheckpointData {
    projection: String,
    position: u64,
}

/// The stream holding the checkpoints of projection `name`: `$checkpoint-<name>`.
pub fn checkpoint_stream(name: &str) -> String {
    format!("{SYSTEM_STREAM_PREFIX}checkpoint-{name}")
}

/// The last checkpoint written for projection `name` (0: none yet).
pub async fn load_checkpoint(store: &(impl EventStore + ?Sized), name: &str) -> Result<u64> {
    Ok(Checkpoints::load(store, name).await?.1)
}

/// The checkpoint stream of one reader of the global log (a projection, the outbox relay), as
/// that reader writes it: [`load`](Self::load) once, then [`save`](Self::save) each new position.
///
/// On a store with exact expected versions each save expects the version the previous load or
/// save left, so a second writer of the same checkpoint (another runner of the same projection,
/// a relay that lost its lease) fails with [`Error::InvalidInput`] instead of interleaving.
#[derive(Debug)]
pub struct Checkpoints {
    stream: String,
    /// The checkpoint stream's version last seen, when the store checks expected versions:
    /// a second runner of the same projection then fails instead of interleaving.
    version: Option<u64>,
}

impl Checkpoints {
    /// The checkpoint writer of `name` and the last position checkpointed (0: none yet).
    pub async fn load(store: &(impl EventStore + ?Sized), name: &str) -> Result<(Self, u64)> {
        let stream = checkpoint_stream(name);
        let caps = store.capabilities();
        let version = store.stream_version(&stream).await?;
        let last = match version {
            None => None,
            Some(v) if caps.read_stream => store.read_stream(&stream, v, 1).await?.pop(),
            Some(_) => last_via_read_all(store, &stream).await?,
        };
        let position = match last {
            Some(event) => decode(&event)?,
            None => 0,
        };
        let version = caps.expected_version.then_some(version.unwrap_or(0));
        Ok((Self { stream, version }, position))
    }

    /// Writes `position` as the new checkpoint of `name`.
    pub async fn save(
        &mut self,
        store: &(impl EventStore + ?Sized),
        name: &str,
        position: u64,
    ) -> Result<()> {
        let event = EventEnvelope::new(
            CHECKPOINT_EVENT_TYPE,
            &CheckpointData {
                projection: name.to_owned(),
                position,
            },
        )?;
        let expected = self
            .version
            .map_or(ExpectedVersion::Any, ExpectedVersion::Exact);
        match store.append(&self.stream, expected, vec![event]).await {
            Ok(written) => {
                if self.version.is_some() {
                    self.version = Some(written.next_expected_version);
                }
                Ok(())
            }
            Err(Error::WrongExpectedVersion { .. }) => Err(Error::invalid(
                "checkpoint",
                format!(
                    "checkpoint stream `{}` was written by someone else: is another runner \
                     of `{name}` (a projection runner, an outbox relay) running?",
                    self.stream
                ),
            )),
            Err(e) => Err(e),
        }
    }
}

fn decode(event: &EventEnvelope) -> Result<u64> {
    Ok(event.data::<CheckpointData>()?.position)
}

/// The last checkpoint event of `stream` on a store without `read_stream`.
async fn last_via_read_all(
    store: &(impl EventStore + ?Sized),
    stream: &str,
) -> Result<Option<EventEnvelope>> {
    let filter = EventFilter::all()
        .event_type(CHECKPOINT_EVENT_TYPE)
        .stream_prefix(stream);
    let mut last = None;
    let mut from = 1;
    loop {
        let page = store
            .read_all(ReadAll::from(from, 1024).filter(filter.clone()))
            .await?;
        let Some(end) = page.last().and_then(EventEnvelope::global_position) else {
            return Ok(last);
        };
        if let Some(event) = page
            .into_iter()
            .rev()
            .find(|e| e.stream_id() == Some(stream))
        {
            last = Some(event);
        }
        from = end + 1;
    }
}
