//! Schema hooks: how the bus and the stores validate events and upcast old versions.
//!
//! The registry that implements these hooks (JSON Schema validation, version migrations)
//! lives in `orchestrator-store`; the core only fixes the seam, so the bus and every store
//! call it the same way. [`NoSchemas`] accepts everything unchanged.
//!
//! ```
//! use orchestrator_core::{EventEnvelope, Error, schema::EventSchemas};
//!
//! /// Rejects `order.placed` events without an `order_id`, and upcasts v1 to v2.
//! struct Orders;
//! impl EventSchemas for Orders {
//!     fn validate(&self, event: &EventEnvelope) -> Result<(), Error> {
//!         let data: serde_json::Value = event.data()?;
//!         if event.event_type() == "order.placed" && data.get("order_id").is_none() {
//!             return Err(Error::decode("data.order_id", "required"));
//!         }
//!         Ok(())
//!     }
//!     fn upcast(&self, event: EventEnvelope) -> Result<EventEnvelope, Error> {
//!         if event.event_type() == "order.placed" && event.schema_version() == 1 {
//!             let mut data: serde_json::Value = event.data()?;
//!             data["currency"] = "EUR".into();
//!             return Ok(event.with_data(&data)?.with_schema_version(2));
//!         }
//!         Ok(event)
//!     }
//! }
//!
//! let v1 = EventEnvelope::new("order.placed", &serde_json::json!({"order_id": "o-1"}))?;
//! let v2 = Orders.upcast(v1)?;
//! assert_eq!(v2.schema_version(), 2);
//! assert!(Orders.validate(&v2).is_ok());
//! # Ok::<(), Error>(())
//! ```

use crate::envelope::EventEnvelope;
use crate::error::Result;

/// Validates events against their schema and upcasts old schema versions to the current one.
///
/// The bus validates before publishing and upcasts before handing an event to a handler;
/// stores upcast on read. A validation error is an [`crate::Error::Decode`] naming the
/// field; events failing validation on delivery are dead-lettered with that reason.
pub trait EventSchemas: Send + Sync + 'static {
    /// Checks `event` against the schema registered for its type and version.
    fn validate(&self, event: &EventEnvelope) -> Result<()>;

    /// Brings `event` to the latest schema version of its type (unchanged if it is current
    /// or unknown).
    fn upcast(&self, event: EventEnvelope) -> Result<EventEnvelope>;
}

/// No schemas: every event is valid and current.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSchemas;

impl EventSchemas for NoSchemas {
    fn validate(&self, _event: &EventEnvelope) -> Result<()> {
        Ok(())
    }
    fn upcast(&self, event: EventEnvelope) -> Result<EventEnvelope> {
        Ok(event)
    }
}
