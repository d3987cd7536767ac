use super::*;
use serde_json::json;

fn full_event() -> EventEnvelope {
    EventEnvelope::new(
        "order.placed",
        &json!({"z": 1, "a": [1.5, "x"], "m": {"b": null}}),
    )
    .unwrap()
    .with_source("urn:shop")
    .with_schema_version(3)
    .with_subject("order-1")
    .with_data_schema("https://schemas.example/order.placed/3")
    .with_correlation_id("corr-1")
    .with_causation_id("cause-1")
    .with_trace_context(TraceContext {
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        tracestate: Some("congo=t61rcWkgMzE".into()),
    })
    .with_header("tenant", "acme")
    .unwrap()
    .with_position(
        "order-1",
        StoredPosition {
            stream_version: 7,
            global_position: 42,
        },
    )
}

#[test]
fn exact_round_trip_keeps_every_attribute_and_payload_bytes() {
    let event = full_event();
    let wire = encode(&event).unwrap();
    let back = decode(&wire).unwrap();
    assert_eq!(back, event);
    // The payload is carried verbatim, key order included.
    assert_eq!(back.data_bytes(), event.data_bytes());
    assert_eq!(encode(&back).unwrap(), wire);
}

#[test]
fn binary_payloads_use_data_base64() {
    let event =
        EventEnvelope::from_bytes("blob.stored", "application/octet-stream", vec![0u8, 255, 7])
            .unwrap();
    let wire: serde_json::Value = serde_json::from_slice(&encode(&event).unwrap()).unwrap();
    assert_eq!(wire["data_base64"], "AP8H");
    assert!(wire.get("data").is_none());
    assert_eq!(decode(&encode(&event).unwrap()).unwrap(), event);
}

#[test]
fn nanosecond_times_round_trip() {
    let time = DateTime::parse_from_rfc3339("2026-11-26T10:11:12.123456789Z")
        .unwrap()
        .with_timezone(&Utc);
    let event = EventEnvelope::new("a.b", &1).unwrap().with_time(time);
    assert_eq!(decode(&encode(&event).unwrap()).unwrap().time(), time);
}

#[test]
fn invalid_json_payload_is_an_encode_error() {
    let event = EventEnvelope::from_bytes("a.b", "application/json", &b"{nope"[..]).unwrap();
    assert!(matches!(encode(&event), Err(Error::Encode { .. })));
}

fn field_of(input: &str) -> String {
    match decode(input.as_bytes()) {
        Err(Error::Decode { field, .. }) => field,
        other => panic!("expected a decode error for {input}, got {other:?}"),
    }
}

#[test]
fn bad_input_names_the_field() {
    let ok = r#""specversion":"1.0","id":"1","source":"s","type":"a.b""#;
    assert_eq!(field_of("not json"), "$");
    assert_eq!(field_of("[1,2]"), "$");
    assert_eq!(field_of(""), "$");
    assert_eq!(
        field_of(r#"{"id":"1","source":"s","type":"a.b"}"#),
        "specversion"
    );
    assert_eq!(
        field_of(r#"{"specversion":"1.0","source":"s","type":"a.b"}"#),
        "id"
    );
    assert_eq!(
        field_of(r#"{"specversion":"1.0","id":"1","type":"a.b"}"#),
        "source"
    );
    assert_eq!(
        field_of(r#"{"specversion":"1.0","id":"1","source":"s"}"#),
        "type"
    );
    assert_eq!(
        field_of(r#"{"specversion":"0.3","id":"1","source":"s","type":"a.b"}"#),
        "specversion"
    );
    assert_eq!(
        field_of(r#"{"specversion":1.0,"id":"1","source":"s","type":"a.b"}"#),
        "specversion"
    );
    assert_eq!(field_of(&format!(r#"{{{ok},"time":"yesterday"}}"#)), "time");
    assert_eq!(
        field_of(&format!(r#"{{{ok},"time":"2026-13-01T00:00:00Z"}}"#)),
        "time"
    );
    assert_eq!(
        field_of(&format!(
            r#"{{{ok},"datacontenttype":"application/octet-stream","data":{{"a":1}}}}"#
        )),
        "data"
    );
    assert_eq!(
        field_of(&format!(r#"{{{ok},"data_base64":"***"}}"#)),
        "data_base64"
    );
    assert_eq!(
        field_of(&format!(r#"{{{ok},"data":1,"data_base64":"AA=="}}"#)),
        "data_base64"
    );
    assert_eq!(field_of(&format!(r#"{{{ok},"Bad-Name":"x"}}"#)), "Bad-Name");
    assert_eq!(field_of(&format!(r#"{{{ok},"x_y":"x"}}"#)), "x_y");
    assert_eq!(
        field_of(&format!(r#"{{{ok},"nested":{{"a":1}}}}"#)),
        "nested"
    );
    assert_eq!(
        field_of(&format!(r#"{{{ok},"schemaversion":-1}}"#)),
        "schemaversion"
    );
    assert_eq!(
        field_of(&format!(r#"{{{ok},"streamversion":1}}"#)),
        "globalposition"
    );
}

#[test]
fn minimal_foreign_event_decodes_with_defaults() {
    let event = decode(
        br#"{"specversion":"1.0","id":"abc","source":"/x","type":"a.b","n":5,"flag":true,"data":{"k":"v"}}"#,
    )
    .unwrap();
    assert_eq!(event.id().as_str(), "abc");
    assert_eq!(event.content_type(), "application/json");
    assert_eq!(event.header("n"), Some("5"));
    assert_eq!(event.header("flag"), Some("true"));
    assert_eq!(
        event.data::<serde_json::Value>().unwrap(),
        json!({"k": "v"})
    );
}

#[test]
fn base64_payload_under_a_json_content_type_must_be_json() {
    // Found by the `cloudevents_decode` fuzz target: such an event decoded to a
    // JSON-typed envelope that `encode` then refused; and JSON with surrounding
    // whitespace decoded to bytes that did not survive a round trip.
    let ok = r#""specversion":"1.0","id":"1","source":"s","type":"a.b""#;
    for content_type in ["", r#","datacontenttype":"application/json""#] {
        // "AP8H" is [0, 255, 7], "e25vcGU=" is `{nope`.
        for b64 in ["AP8H", "e25vcGU="] {
            let input = format!(r#"{{{ok}{content_type},"data_base64":"{b64}"}}"#);
            assert_eq!(field_of(&input), "data_base64", "{input}");
        }
    }
    // JSON bytes decode, as the JSON text alone, and round trip.
    // "IHsiYSI6IDF9IAo=" is ` {"a": 1} \n`.
    let event = decode(
        format!(
            r#"{{{ok},"datacontenttype":"application/json","data_base64":"IHsiYSI6IDF9IAo="}}"#
        )
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(&event.data_bytes()[..], br#"{"a": 1}"#);
    assert_eq!(decode(&encode(&event).unwrap()).unwrap(), event);
    // Other content types keep any bytes.
    let event = decode(
        format!(r#"{{{ok},"datacontenttype":"application/octet-stream","data_base64":"AP8H"}}"#)
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(&event.data_bytes()[..], [0, 255, 7]);
}

#[test]
fn text_data_with_text_content_type() {
    let event = decode(
        br#"{"specversion":"1.0","id":"1","source":"s","type":"a.b","datacontenttype":"text/plain","data":"hello"}"#,
    )
    .unwrap();
    assert_eq!(&event.data_bytes()[..], b"hello");
}
