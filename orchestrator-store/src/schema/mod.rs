//! The schema registry: JSON Schemas for each version of each event type, and the upcasters
//! that carry old versions forward.
//!
//! [`SchemaRegistry`] implements the core [`EventSchemas`] hook, so the bus validates with it
//! before publishing and upcasts with it before handing events to handlers; wrap any store
//! in a [`ValidatingStore`] to validate on append and upcast on read.
//!
//! Rules:
//! - Versions of a type are registered in order: the first may have any number, each later
//!   one is the previous plus one and must come with an upcaster from the previous version
//!   ([`Error::MissingUpcaster`] otherwise), so every stored version can be read as the
//!   latest one.
//! - Validation checks an event against the schema of *its* version (an old producer may
//!   still write v1; readers get it upcast). A violation is [`Error::SchemaViolation`] with
//!   the JSON pointer of the first offending value — or, for a missing required property,
//!   the pointer the property would have — which the core error carries as
//!   [`Decode { field }`](orchestrator_core::Error::Decode). The reason names the keyword
//!   and the schema location, never payload data.
//! - A version the registry does not know for a registered type is
//!   [`Error::UnknownSchemaVersion`] (a core `Decode` error on field `schemaversion`).
//! - Event types with no schema registered pass unchanged.
//! - Only JSON payloads can be checked: a non-JSON payload of a registered type is a core
//!   `Decode` error on field `datacontenttype`.
//!
//! ```
//! use orchestrator_core::{EventEnvelope, schema::EventSchemas};
//! use orchestrator_store::schema::{SchemaRegistry, SchemaVersion};
//! use serde_json::json;
//!
//! let registry = SchemaRegistry::new();
//! registry.register(SchemaVersion::new("order.placed", 1, json!({
//!     "type": "object",
//!     "required": ["order_id"],
//!     "properties": { "order_id": { "type": "string" } }
//! })))?;
//! registry.register(
//!     SchemaVersion::new("order.placed", 2, json!({
//!         "type": "object",
//!         "required": ["order_id", "currency"]
//!     }))
//!     .upcast_from_previous(|mut v1| {
//!         v1["currency"] = json!("EUR");
//!         Ok(v1)
//!     }),
//! )?;
//!
//! let bad = EventEnvelope::new("order.placed", &json!({ "order_id": 7 }))?;
//! assert_eq!(registry.validate(&bad).unwrap_err().decode_field(), Some("/order_id"));
//!
//! let v1 = EventEnvelope::new("order.placed", &json!({ "order_id": "o-1" }))?;
//! let latest = registry.upcast(v1)?;
//! assert_eq!(latest.schema_version(), 2);
//! assert_eq!(latest.data::<serde_json::Value>()?["currency"], "EUR");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod validating;

use std::collections::HashMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::sync::{Arc, PoisonError, RwLock};

use orchestrator_core::schema::EventSchemas;
use orchestrator_core::{Error as CoreError, EventEnvelope};
use serde_json::Value;

use crate::error::{Error, Result};

pub use validating::ValidatingStore;

/// A function that turns a payload of version `n - 1` into one of version `n`.
pub type Upcaster = Arc<dyn Fn(Value) -> orchestrator_core::Result<Value> + Send + Sync>;

/// One version of an event type's schema, to [`SchemaRegistry::register`].
pub struct SchemaVersion {
    event_type: String,
    version: u32,
    schema: Value,
    upcaster: Option<Upcaster>,
}

impl SchemaVersion {
    /// Version `version` of `event_type`, whose payloads must match the JSON Schema `schema`.
    pub fn new(event_type: impl Into<String>, version: u32, schema: Value) -> Self {
        Self {
            event_type: event_type.into(),
            version,
            schema,
            upcaster: None,
        }
    }

    /// How a payload of the previous version becomes one of this version (required for
    /// every version but a type's first).
    pub fn upcast_from_previous(
        mut self,
        upcaster: impl Fn(Value) -> orchestrator_core::Result<Value> + Send + Sync + 'static,
    ) -> Self {
        self.upcaster = Some(Arc::new(upcaster));
        self
    }
}

impl fmt::Debug for SchemaVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SchemaVersion")
            .field("event_type", &self.event_type)
            .field("version", &self.version)
            .field("upcaster", &self.upcaster.is_some())
            .finish_non_exhaustive()
    }
}

struct Registered {
    validator: jsonschema::Validator,
    /// From the previous version; `None` for the first.
    upcaster: Option<Upcaster>,
}

struct TypeSchemas {
    first: u32,
    /// `versions[i]` is version `first + i`.
    versions: Vec<Registered>,
}

impl TypeSchemas {
    fn latest(&self) -> u32 {
        self.first + u32::try_from(self.versions.len()).unwrap_or(u32::MAX) - 1
    }

    fn range(&self) -> RangeInclusive<u32> {
        self.first..=self.latest()
    }

    fn get(&self, version: u32) -> Option<&Registered> {
        let i = version.checked_sub(self.first)?;
        self.versions.get(usize::try_from(i).ok()?)
    }

    fn unknown(&self, event_type: &str, version: u32) -> Error {
        let range = self.range();
        Error::UnknownSchemaVersion {
            event_type: event_type.to_owned(),
            version,
            registered: format!("{}..={}", range.start(), range.end()),
        }
    }
}

/// Schemas and upcasters per event type and version; see the [module docs](self).
///
/// Shared freely (`Arc<SchemaRegistry>`); registering takes `&self`.
#[derive(Default)]
pub struct SchemaRegistry {
    types: RwLock<HashMap<String, TypeSchemas>>,
}

impl fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let types = self.read();
        let mut map = f.debug_map();
        for (event_type, schemas) in types.iter() {
            map.entry(event_type, &schemas.range());
        }
        map.finish()
    }
}

impl SchemaRegistry {
    /// An empty registry: every event passes unchanged.
    pub fn new() -> Self {
        Self::default()
    }

    // Registration validates everything before touching the map, so a panic cannot leave
    // it half-updated: a poisoned lock is safe to use.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, TypeSchemas>> {
        self.types.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a version; see the [module docs](self) for the rules.
    pub fn register(&self, version: SchemaVersion) -> Result<()> {
        let SchemaVersion {
            event_type,
            version,
            schema,
            upcaster,
        } = version;
        orchestrator_core::envelope::validate_event_type(&event_type)?;
        let validator = jsonschema::validator_for(&schema).map_err(|e| Error::InvalidSchema {
            event_type: event_type.clone(),
            version,
            reason: e.to_string(),
        })?;
        let mut types = self.types.write().unwrap_or_else(PoisonError::into_inner);
        match types.get_mut(&event_type) {
            None => {
                types.insert(
                    event_type,
                    TypeSchemas {
                        first: version,
                        versions: vec![Registered {
                            validator,
                            upcaster,
                        }],
                    },
                );
            }
            Some(schemas) => {
                let previous = schemas.latest();
                let expected = previous.saturating_add(1);
                if version != expected {
                    return Err(Error::VersionOutOfOrder {
                        event_type,
                        version,
                        expected,
                    });
                }
                let Some(upcaster) = upcaster else {
                    return Err(Error::MissingUpcaster {
                        event_type,
                        version,
                        previous,
                    });
                };
                schemas.versions.push(Registered {
                    validator,
                    upcaster: Some(upcaster),
                });
            }
        }
        Ok(())
    }

    /// Registers a version and returns the registry, for building one in an expression.
    pub fn with(self, version: SchemaVersion) -> Result<Self> {
        self.register(version)?;
        Ok(self)
    }

    /// The versions registered for `event_type`, if any.
    pub fn versions(&self, event_type: &str) -> Option<RangeInclusive<u32>> {
        self.read().get(event_type).map(TypeSchemas::range)
    }

    /// Every registered event type with its versions, sorted by event type.
    pub fn event_types(&self) -> Vec<(String, RangeInclusive<u32>)> {
        let mut types: Vec<_> = self
            .read()
            .iter()
            .map(|(event_type, schemas)| (event_type.clone(), schemas.range()))
            .collect();
        types.sort_by(|a, b| a.0.cmp(&b.0));
        types
    }

    /// The latest version of `event_type`, if it is registered.
    pub fn latest_version(&self, event_type: &str) -> Option<u32> {
        self.read().get(event_type).map(TypeSchemas::latest)
    }

    /// Checks `event` against the schema of its type and version, with a typed error.
    pub fn check(&self, event: &EventEnvelope) -> Result<()> {
        let types = self.read();
        let Some(schemas) = types.get(event.event_type()) else {
            return Ok(());
        };
        let version = event.schema_version();
        let registered = schemas
            .get(version)
            .ok_or_else(|| schemas.unknown(event.event_type(), version))?;
        let payload = json_payload(event)?;
        match registered.validator.validate(&payload) {
            Ok(()) => Ok(()),
            Err(violation) => Err(Error::SchemaViolation {
                event_type: event.event_type().to_owned(),
                version,
                pointer: pointer_of(&violation),
                reason: format!(
                    "fails `{}` (schema location `{}`)",
                    violation.kind().keyword(),
                    violation.schema_path()
                ),
            }),
        }
    }

    /// Brings `event` to the latest version of its type through the chain of upcasters,
    /// with a typed error. Events of unregistered types, or already current, pass unchanged.
    pub fn upcast_event(&self, event: EventEnvelope) -> Result<EventEnvelope> {
        let types = self.read();
        let Some(schemas) = types.get(event.event_type()) else {
            return Ok(event);
        };
        let version = event.schema_version();
        let latest = schemas.latest();
        if version == latest {
            return Ok(event);
        }
        if schemas.get(version).is_none() {
            return Err(schemas.unknown(event.event_type(), version));
        }
        let mut payload = json_payload(&event)?;
        for next in version + 1..=latest {
            let upcaster = schemas
                .get(next)
                .and_then(|r| r.upcaster.as_ref())
                .ok_or_else(|| schemas.unknown(event.event_type(), next))?;
            payload = upcaster(payload)?;
        }
        Ok(event.with_data(&payload)?.with_schema_version(latest))
    }
}

fn json_payload(event: &EventEnvelope) -> Result<Value> {
    if !event.is_json() {
        return Err(Error::Core(CoreError::decode(
            "datacontenttype",
            format!(
                "event type `{}` has JSON Schemas, but the payload is `{}`",
                event.event_type(),
                event.content_type()
            ),
        )));
    }
    Ok(event.data::<Value>()?)
}

/// The JSON pointer of a violation; for a missing required property, the property's own.
fn pointer_of(violation: &jsonschema::ValidationError<'_>) -> String {
    let mut pointer = violation.instance_path().as_str().to_owned();
    if let jsonschema::error::ValidationErrorKind::Required {
        property: Value::String(name),
    } = violation.kind()
    {
        pointer.push('/');
        pointer.push_str(&name.replace('~', "~0").replace('/', "~1"));
    }
    pointer
}

impl EventSchemas for SchemaRegistry {
    fn validate(&self, event: &EventEnvelope) -> orchestrator_core::Result<()> {
        Ok(self.check(event)?)
    }

    fn upcast(&self, event: EventEnvelope) -> orchestrator_core::Result<EventEnvelope> {
        Ok(self.upcast_event(event)?)
    }
}
