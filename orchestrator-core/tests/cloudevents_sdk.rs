//! Interoperability with the official CloudEvents Rust SDK (`cloudevents-sdk` 0.9): what we
//! encode parses there with every attribute intact, and what it writes decodes here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Utc};
use cloudevents::event::ExtensionValue;
use cloudevents::{AttributesReader, Data, EventBuilder, EventBuilderV10};
use orchestrator_core::{EventEnvelope, StoredPosition, TraceContext, cloudevents as ce};
use serde_json::json;

fn rich_event() -> EventEnvelope {
    EventEnvelope::new(
        "order.placed",
        &json!({"order_id": "o-1", "lines": [1, 2, 3]}),
    )
    .unwrap()
    .with_source("https://shop.example/orders")
    .with_schema_version(2)
    .with_subject("o-1")
    .with_data_schema("https://schemas.example/order.placed/2.json")
    .with_correlation_id("corr-9")
    .with_causation_id("cause-8")
    .with_trace_context(TraceContext {
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        tracestate: Some("vendor=abc".into()),
    })
    .with_header("tenant", "acme")
    .unwrap()
    .with_position(
        "order-o-1",
        StoredPosition {
            stream_version: 4,
            global_position: 1234,
        },
    )
}

fn ext(event: &cloudevents::Event, name: &str) -> ExtensionValue {
    event
        .extension(name)
        .cloned()
        .unwrap_or_else(|| panic!("extension {name} missing"))
}

#[test]
fn our_encoding_parses_in_the_sdk_with_every_attribute() {
    let ours = rich_event();
    let wire = ce::encode(&ours).unwrap();
    let sdk: cloudevents::Event = serde_json::from_slice(&wire).unwrap();

    assert_eq!(sdk.id(), ours.id().as_str());
    assert_eq!(sdk.ty(), "order.placed");
    assert_eq!(sdk.source().as_str(), "https://shop.example/orders");
    assert_eq!(sdk.subject(), Some("o-1"));
    assert_eq!(
        sdk.dataschema().map(|u| u.as_str()),
        Some("https://schemas.example/order.placed/2.json")
    );
    assert_eq!(sdk.datacontenttype(), Some("application/json"));
    assert_eq!(sdk.time(), Some(&ours.time()));
    assert_eq!(
        sdk.data(),
        Some(&Data::Json(json!({"order_id": "o-1", "lines": [1, 2, 3]})))
    );
    assert_eq!(ext(&sdk, "schemaversion"), ExtensionValue::Integer(2));
    assert_eq!(ext(&sdk, "correlationid"), ExtensionValue::from("corr-9"));
    assert_eq!(ext(&sdk, "causationid"), ExtensionValue::from("cause-8"));
    assert_eq!(
        ext(&sdk, "traceparent"),
        ExtensionValue::from("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(ext(&sdk, "tracestate"), ExtensionValue::from("vendor=abc"));
    assert_eq!(ext(&sdk, "tenant"), ExtensionValue::from("acme"));
    assert_eq!(ext(&sdk, "streamid"), ExtensionValue::from("order-o-1"));
    assert_eq!(ext(&sdk, "streamversion"), ExtensionValue::Integer(4));
    assert_eq!(ext(&sdk, "globalposition"), ExtensionValue::Integer(1234));

    // And the SDK's re-encoding still decodes to the same envelope.
    let again = serde_json::to_vec(&sdk).unwrap();
    assert_eq!(ce::decode(&again).unwrap(), ours);
}

#[test]
fn binary_payloads_survive_the_sdk() {
    let ours = EventEnvelope::from_bytes(
        "blob.stored",
        "application/octet-stream",
        vec![0u8, 1, 2, 254, 255],
    )
    .unwrap();
    let sdk: cloudevents::Event = serde_json::from_slice(&ce::encode(&ours).unwrap()).unwrap();
    assert_eq!(sdk.data(), Some(&Data::Binary(vec![0, 1, 2, 254, 255])));
    let back = ce::decode(&serde_json::to_vec(&sdk).unwrap()).unwrap();
    assert_eq!(back, ours);
}

#[test]
fn sdk_events_decode_here() {
    let time: DateTime<Utc> = "2026-11-26T12:00:00.5Z".parse().unwrap();
    let sdk = EventBuilderV10::new()
        .id("evt-from-sdk")
        .source("urn:other-service")
        .ty("user.created")
        .subject("u-1")
        .time(time)
        .data("application/json", json!({"user_id": "u-1"}))
        .extension("correlationid", "c-1")
        .extension("schemaversion", 3i64)
        .extension("region", "eu")
        .extension("retries", 2i64)
        .extension("vip", true)
        .build()
        .unwrap();
    let wire = serde_json::to_vec(&sdk).unwrap();
    let ours = ce::decode(&wire).unwrap();

    assert_eq!(ours.id().as_str(), "evt-from-sdk");
    assert_eq!(ours.event_type(), "user.created");
    assert_eq!(ours.source(), "urn:other-service");
    assert_eq!(ours.subject(), Some("u-1"));
    assert_eq!(ours.time(), time);
    assert_eq!(ours.correlation_id(), Some("c-1"));
    assert_eq!(ours.schema_version(), 3);
    assert_eq!(ours.header("region"), Some("eu"));
    assert_eq!(ours.header("retries"), Some("2"));
    assert_eq!(ours.header("vip"), Some("true"));
    assert_eq!(
        ours.data::<serde_json::Value>().unwrap(),
        json!({"user_id": "u-1"})
    );
}

#[test]
fn sdk_text_and_binary_data_decode_here() {
    let text = EventBuilderV10::new()
        .id("1")
        .source("urn:s")
        .ty("note.added")
        .data("text/plain", "hello")
        .build()
        .unwrap();
    let ours = ce::decode(&serde_json::to_vec(&text).unwrap()).unwrap();
    assert_eq!(ours.content_type(), "text/plain");
    assert_eq!(&ours.data_bytes()[..], b"hello");

    let binary = EventBuilderV10::new()
        .id("2")
        .source("urn:s")
        .ty("blob.stored")
        .data("application/octet-stream", vec![9u8, 8, 7])
        .build()
        .unwrap();
    let ours = ce::decode(&serde_json::to_vec(&binary).unwrap()).unwrap();
    assert_eq!(&ours.data_bytes()[..], &[9, 8, 7]);
}
