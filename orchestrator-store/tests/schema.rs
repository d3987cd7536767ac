//! The schema registry: registration rules, validation with JSON pointers, upcasting chains,
//! unknown versions, and the validating store wrapper.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use futures::StreamExt;
use orchestrator_core::ExpectedVersion::Any;
use orchestrator_core::schema::EventSchemas;
use orchestrator_core::{Error as CoreError, EventEnvelope, EventFilter, EventStore, ReadAll};
use orchestrator_store::schema::{SchemaRegistry, SchemaVersion, ValidatingStore};
use orchestrator_store::{Error, InMemoryEventStore};
use serde_json::{Value, json};

const PLACED: &str = "order.placed";

/// v1 `{order_id, amount}`, v2 adds `currency`, v3 renames `amount` to `amount_cents`.
fn orders() -> SchemaRegistry {
    SchemaRegistry::new()
        .with(SchemaVersion::new(
            PLACED,
            1,
            json!({
                "type": "object",
                "required": ["order_id", "amount"],
                "properties": {
                    "order_id": { "type": "string" },
                    "amount": { "type": "integer" },
                    "items": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["sku"],
                            "properties": { "qty": { "type": "integer", "minimum": 1 } }
                        }
                    },
                    "customer": { "type": "object", "required": ["id"] }
                }
            }),
        ))
        .unwrap()
        .with(
            SchemaVersion::new(
                PLACED,
                2,
                json!({ "type": "object", "required": ["order_id", "amount", "currency"] }),
            )
            .upcast_from_previous(|mut v| {
                v["currency"] = json!("EUR");
                Ok(v)
            }),
        )
        .unwrap()
        .with(
            SchemaVersion::new(
                PLACED,
                3,
                json!({
                    "type": "object",
                    "required": ["order_id", "amount_cents", "currency"],
                    "not": { "required": ["amount"] }
                }),
            )
            .upcast_from_previous(|mut v| {
                let amount = v.as_object_mut().and_then(|o| o.remove("amount"));
                v["amount_cents"] = amount.unwrap_or(Value::Null);
                Ok(v)
            }),
        )
        .unwrap()
}

fn placed(version: u32, data: Value) -> EventEnvelope {
    EventEnvelope::new(PLACED, &data)
        .unwrap()
        .with_schema_version(version)
}

#[test]
fn upcasters_chain_from_any_old_version_to_the_latest() {
    let registry = orders();
    assert_eq!(registry.versions(PLACED), Some(1..=3));
    let v1 = placed(1, json!({ "order_id": "o-1", "amount": 250 }));
    let v3 = registry.upcast(v1.clone()).unwrap();
    assert_eq!(v3.schema_version(), 3);
    assert_eq!(
        v3.data::<Value>().unwrap(),
        json!({ "order_id": "o-1", "amount_cents": 250, "currency": "EUR" })
    );
    assert_eq!(v3.id(), v1.id(), "upcasting keeps the envelope");
    registry.validate(&v3).unwrap();

    let v2 = placed(
        2,
        json!({ "order_id": "o-2", "amount": 1, "currency": "USD" }),
    );
    let from_v2 = registry.upcast(v2).unwrap();
    assert_eq!(from_v2.data::<Value>().unwrap()["currency"], "USD");
    let current = placed(3, json!({ "whatever": true }));
    assert_eq!(registry.upcast(current.clone()).unwrap(), current);
    let unregistered = EventEnvelope::new("other.thing", &json!(1)).unwrap();
    assert_eq!(registry.upcast(unregistered.clone()).unwrap(), unregistered);
}

#[test]
fn a_version_without_an_upcaster_from_the_previous_is_refused() {
    let registry = orders();
    let schema = json!({ "type": "object" });
    match registry.register(SchemaVersion::new(PLACED, 4, schema.clone())) {
        Err(Error::MissingUpcaster {
            version: 4,
            previous: 3,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let upcast = |v: SchemaVersion| v.upcast_from_previous(Ok);
    match registry.register(upcast(SchemaVersion::new(PLACED, 6, schema.clone()))) {
        Err(Error::VersionOutOfOrder { expected: 4, .. }) => {}
        other => panic!("{other:?}"),
    }
    match registry.register(upcast(SchemaVersion::new(PLACED, 2, schema.clone()))) {
        Err(Error::VersionOutOfOrder { expected: 4, .. }) => {}
        other => panic!("{other:?}"),
    }
    match registry.register(SchemaVersion::new("x.y", 1, json!({ "type": 12 }))) {
        Err(Error::InvalidSchema { .. }) => {}
        other => panic!("{other:?}"),
    }
    let err: CoreError = registry
        .register(SchemaVersion::new(PLACED, 4, schema))
        .unwrap_err()
        .into();
    assert!(matches!(err, CoreError::InvalidInput { .. }), "{err}");
    assert_eq!(registry.latest_version(PLACED), Some(3));
    registry
        .register(SchemaVersion::new("a.first", 1, json!({})))
        .unwrap();
    assert_eq!(
        registry.event_types(),
        vec![("a.first".to_owned(), 1..=1), (PLACED.to_owned(), 1..=3)],
        "every registered type, sorted, with its versions"
    );
}

#[test]
fn violations_name_the_json_pointer_of_the_first_offending_value() {
    let registry = orders();
    let cases = [
        (json!({ "order_id": 7, "amount": 1 }), "/order_id"),
        (json!({ "order_id": "o", "amount": 1.5 }), "/amount"),
        (json!({ "amount": 1 }), "/order_id"),
        (
            json!({ "order_id": "o", "amount": 1, "items": [{ "sku": "a" }, { "sku": "b", "qty": 0 }] }),
            "/items/1/qty",
        ),
        (
            json!({ "order_id": "o", "amount": 1, "items": [{ "qty": 2 }] }),
            "/items/0/sku",
        ),
        (
            json!({ "order_id": "o", "amount": 1, "customer": {} }),
            "/customer/id",
        ),
        (json!([1, 2]), ""),
    ];
    for (data, pointer) in cases {
        let event = placed(1, data.clone());
        match registry.check(&event) {
            Err(Error::SchemaViolation {
                pointer: got,
                reason,
                version: 1,
                ..
            }) => {
                assert_eq!(got, pointer, "{data}");
                assert!(
                    !reason.contains("1.5"),
                    "no payload data in errors: {reason}"
                );
            }
            other => panic!("{data}: {other:?}"),
        }
        let core = registry.validate(&event).unwrap_err();
        assert_eq!(core.decode_field(), Some(pointer), "{data}");
    }
    registry
        .validate(&placed(1, json!({ "order_id": "o", "amount": 3 })))
        .unwrap();
}

#[test]
fn an_unknown_schema_version_is_a_typed_error() {
    let registry = orders();
    for version in [0, 4, 99] {
        let event = placed(version, json!({ "order_id": "o", "amount": 1 }));
        match registry.check(&event) {
            Err(Error::UnknownSchemaVersion {
                version: v,
                registered,
                ..
            }) => assert_eq!((v, registered.as_str()), (version, "1..=3")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            registry.upcast_event(event.clone()),
            Err(Error::UnknownSchemaVersion { .. })
        ));
        let core = registry.upcast(event).unwrap_err();
        assert_eq!(core.decode_field(), Some("schemaversion"));
    }
}

#[test]
fn only_json_payloads_of_registered_types_can_be_checked() {
    let registry = orders();
    let binary = EventEnvelope::from_bytes(PLACED, "application/octet-stream", vec![1, 2]).unwrap();
    assert_eq!(
        registry.validate(&binary).unwrap_err().decode_field(),
        Some("datacontenttype")
    );
    let other =
        EventEnvelope::from_bytes("blob.saved", "application/octet-stream", vec![1]).unwrap();
    registry.validate(&other).unwrap();
    let as_hook: Arc<dyn EventSchemas> = Arc::new(orders());
    as_hook.validate(&other).unwrap();
}

#[tokio::test]
async fn the_validating_store_rejects_on_append_and_upcasts_on_read() {
    let inner = InMemoryEventStore::new();
    let store = ValidatingStore::new(inner.clone(), Arc::new(orders()));
    let good = placed(1, json!({ "order_id": "o-1", "amount": 5 }));
    let bad = placed(1, json!({ "order_id": "o-2" }));
    let err = store
        .append("orders", Any, vec![good.clone(), bad])
        .await
        .unwrap_err();
    assert_eq!(err.decode_field(), Some("/amount"));
    assert_eq!(inner.head_position().await.unwrap(), 0, "nothing written");
    let unknown = placed(9, json!({}));
    let err = store
        .append("orders", Any, vec![unknown.clone()])
        .await
        .unwrap_err();
    assert_eq!(err.decode_field(), Some("schemaversion"));

    store.append("orders", Any, vec![good]).await.unwrap();
    let mut sub = store.subscribe(0, EventFilter::all()).await.unwrap();
    for events in [
        store.read_stream("orders", 1, 10).await.unwrap(),
        store.read_all(ReadAll::from(0, 10)).await.unwrap(),
        vec![sub.next().await.unwrap().unwrap()],
    ] {
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].schema_version(), 3);
        assert_eq!(events[0].data::<Value>().unwrap()["amount_cents"], 5);
    }
    // As stored, it is still v1.
    let raw = inner.read_stream("orders", 1, 10).await.unwrap();
    assert_eq!(raw[0].schema_version(), 1);

    // An event of an unknown version that got in some other way fails the read, typed.
    inner.append("orders", Any, vec![unknown]).await.unwrap();
    let err = store.read_stream("orders", 1, 10).await.unwrap_err();
    assert_eq!(err.decode_field(), Some("schemaversion"));
    let item = sub.next().await.unwrap();
    assert_eq!(item.unwrap_err().decode_field(), Some("schemaversion"));
}
