//! Read models on the query bus: attaching them, and waiting for them to reach a position.

use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use orchestrator_core::EventStore;
use orchestrator_store::projection::{ProjectionRunner, ProjectionState};
use tokio::sync::watch;

use super::QueryBus;
use crate::command::check_name;
use crate::error::{Error, HandlerKind, Result};
use crate::read_model::{Attached, Feed, ReadModelDefinition, ReadModelHandle};

impl QueryBus {
    /// Waits until the read models named in `reads` (all attached ones if empty) have seen
    /// `position`, for at most `timeout` on the bus's clock.
    pub async fn wait_for_position(
        &self,
        reads: &[String],
        position: u64,
        timeout: Duration,
    ) -> Result<()> {
        let models: Vec<ReadModelHandle> = {
            let all = self.read_models();
            if reads.is_empty() {
                all.values().cloned().collect()
            } else {
                let mut models = Vec::with_capacity(reads.len());
                for name in reads {
                    let model = all.get(name).cloned().ok_or_else(|| {
                        Error::invalid(
                            "read model",
                            format!("`{name}` is not attached to this query bus"),
                        )
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
            return Err(Error::invalid(
                "read model",
                format!("`{name}` is already attached"),
            ));
        }
        let attached = Arc::new(Attached {
            name: name.as_str().into(),
            storage,
            position: watch::Sender::new(0),
            stopping: watch::Sender::new(false),
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
        let status = handle
            .wait_for(|s| s.state != ProjectionState::Starting)
            .await;
        attached
            .position
            .send_modify(|p| *p = (*p).max(status.position));
        *attached.projection.write().await = Some(handle);
        let model = ReadModelHandle { attached };
        let attached_twice = {
            let mut read_models = self
                .inner
                .read_models
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            match read_models.entry(name.clone()) {
                std::collections::btree_map::Entry::Occupied(_) => true,
                std::collections::btree_map::Entry::Vacant(slot) => {
                    slot.insert(model.clone());
                    false
                }
            }
        };
        if attached_twice {
            model.stop().await;
            return Err(Error::invalid(
                "read model",
                format!("`{name}` is already attached"),
            ));
        }
        Ok(model)
    }

    /// The attached read model `name`.
    pub fn read_model(&self, name: &str) -> Option<ReadModelHandle> {
        self.read_models().get(name).cloned()
    }

    /// Stops every read model's projection.
    pub async fn shutdown(&self) {
        let models: Vec<_> = self.read_models().values().cloned().collect();
        for model in models {
            model.stop().await;
        }
    }
}
