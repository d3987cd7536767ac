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
fn times_outside_four_digit_years_are_refused_before_they_are_written() {
    use chrono::TimeZone as _;
    let last = Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap();
    let event = EventEnvelope::new("a.b", &1).unwrap().with_time(last);
    assert_eq!(decode(&encode(&event).unwrap()).unwrap().time(), last);
    for year in [10_000, 200_000, -1] {
        let time = Utc.with_ymd_and_hms(year, 1, 1, 0, 0, 0).unwrap();
        let event = EventEnvelope::new("a.b", &1).unwrap().with_time(time);
        match encode(&event) {
            Err(Error::Encode { reason }) => {
                assert!(reason.contains("0000 to 9999"), "{reason}");
            }
            other => panic!("year {year}: {other:?}"),
        }
    }
    // Four-digit years whose offset takes them out of range in UTC are refused on decode,
    // so whatever decodes can be encoded again.
    let ok = r#""specversion":"1.0","id":"1","source":"s","type":"a.b""#;
    for time in ["0000-01-01T00:00:00+01:00", "9999-12-31T23:00:00-02:00"] {
        assert_eq!(
            field_of(&format!(r#"{{{ok},"time":"{time}"}}"#)),
            "time",
            "{time}"
        );
    }
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

/// The attributes of a minimal valid event, without the closing brace.
const HEAD: &str = r#"{"specversion":"1.0","id":"1","source":"s","type":"a.b""#;

/// `HEAD` and `members`, closed.
fn object_with(members: impl IntoIterator<Item = String>) -> String {
    let mut text = String::from(HEAD);
    for member in members {
        text.push(',');
        text.push_str(&member);
    }
    text.push('}');
    text
}

fn decode_error(input: &str) -> (String, String) {
    match decode(input.as_bytes()) {
        Err(Error::Decode { field, reason }) => (field, reason),
        other => panic!("expected a decode error, got {other:?}"),
    }
}

#[test]
fn a_repeated_attribute_keeps_its_last_value_and_null_means_absent() {
    let event = decode(
        object_with([
            r#""tenant":"a""#.into(),
            r#""tenant":"b""#.into(),
            r#""region":"x""#.into(),
            r#""region":null"#.into(),
            r#""zone":null"#.into(),
            r#""zone":"z""#.into(),
            r#""subject":"s1""#.into(),
            r#""subject":"s2""#.into(),
            r#""correlationid":"c""#.into(),
            r#""correlationid":null"#.into(),
        ])
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(event.header("tenant"), Some("b"));
    assert_eq!(event.header("region"), None);
    assert_eq!(event.header("zone"), Some("z"));
    assert_eq!(event.headers().len(), 2);
    assert_eq!(event.subject(), Some("s2"));
    assert_eq!(event.correlation_id(), None);
}

#[test]
fn a_1_mib_event_of_90k_extension_keys_is_refused_naming_the_limit() {
    // Issue 19: this decoded in the end, after seconds of quadratic work, and so was never
    // dead-lettered. Now reading stops at the member over `MAX_ATTRIBUTES`.
    let input = object_with((0..90_000).map(|i| format!(r#""k{i:05}":1"#)));
    assert!(input.len() > 1_000_000 - 20_000, "{}", input.len());
    let (field, reason) = decode_error(&input);
    assert_eq!(field, "$");
    assert!(reason.contains("cloudevents::MAX_ATTRIBUTES"), "{reason}");
    assert!(reason.contains("274"), "{reason}");
}

#[test]
fn the_same_key_repeated_counts_against_the_member_limit() {
    let input = object_with((0..=MAX_ATTRIBUTES).map(|_| r#""tenant":"acme""#.to_owned()));
    let (field, reason) = decode_error(&input);
    assert_eq!(field, "$");
    assert!(reason.contains("MAX_ATTRIBUTES"), "{reason}");
    // Up to the limit, repeats are read as before: the last value wins.
    let members = MAX_ATTRIBUTES - 4; // the four of `HEAD`
    let input = object_with((0..members).map(|i| format!(r#""tenant":"{i}""#)));
    let last = (members - 1).to_string();
    assert_eq!(
        decode(input.as_bytes()).unwrap().header("tenant"),
        Some(last.as_str())
    );
}

#[test]
fn extensions_up_to_the_limit_decode_and_one_more_is_refused() {
    let exactly = object_with((0..MAX_EXTENSIONS).map(|i| format!(r#""k{i}":"v""#)));
    let event = decode(exactly.as_bytes()).unwrap();
    assert_eq!(event.headers().len(), MAX_EXTENSIONS);
    assert_eq!(decode(&encode(&event).unwrap()).unwrap(), event);

    let over = object_with((0..=MAX_EXTENSIONS).map(|i| format!(r#""k{i}":"v""#)));
    let (field, reason) = decode_error(&over);
    assert_eq!(field, "$");
    assert!(reason.contains("257 extension attributes"), "{reason}");
    assert!(reason.contains("cloudevents::MAX_EXTENSIONS"), "{reason}");
}

#[test]
fn a_long_extension_name_is_refused_and_shown_shortened() {
    let name = "n".repeat(MAX_EXTENSION_NAME_LEN);
    let event = decode(object_with([format!(r#""{name}":1"#)]).as_bytes()).unwrap();
    assert_eq!(event.header(&name), Some("1"));

    let long = "n".repeat(1 << 20);
    let (field, reason) = decode_error(&object_with([format!(r#""{long}":1"#)]));
    assert_eq!(field, format!("{name}…"));
    assert!(reason.contains("1048576 bytes long"), "{reason}");
    assert!(
        reason.contains("cloudevents::MAX_EXTENSION_NAME_LEN"),
        "{reason}"
    );
    assert!(
        reason.len() < 1000,
        "the error repeats the name: {} bytes",
        reason.len()
    );
}

#[test]
fn a_long_extension_value_is_refused_measured_as_text() {
    let fits = "v".repeat(MAX_EXTENSION_VALUE_LEN);
    let event = decode(object_with([format!(r#""tenant":"{fits}""#)]).as_bytes()).unwrap();
    assert_eq!(
        event.header("tenant").map(str::len),
        Some(MAX_EXTENSION_VALUE_LEN)
    );
    // Escapes count as the characters they stand for: 8192 `\u0041` are 8192 bytes of text.
    let escaped = "\\u0041".repeat(MAX_EXTENSION_VALUE_LEN);
    let event = decode(object_with([format!(r#""tenant":"{escaped}""#)]).as_bytes()).unwrap();
    assert_eq!(
        event.header("tenant").map(str::len),
        Some(MAX_EXTENSION_VALUE_LEN)
    );

    let over = "v".repeat(MAX_EXTENSION_VALUE_LEN + 1);
    let (field, reason) = decode_error(&object_with([format!(r#""tenant":"{over}""#)]));
    assert_eq!(field, "tenant");
    assert!(reason.contains("8193 bytes long"), "{reason}");
    assert!(
        reason.contains("cloudevents::MAX_EXTENSION_VALUE_LEN"),
        "{reason}"
    );
    let digits = "9".repeat(MAX_EXTENSION_VALUE_LEN + 1);
    assert_eq!(
        decode_error(&object_with([format!(r#""n":{digits}"#)])).0,
        "n"
    );
}

#[test]
fn deep_nesting_is_kept_in_data_and_refused_in_an_extension_without_recursion() {
    // Far deeper than serde_json's recursion limit (128) or any stack: nothing recurses.
    let depth = 200_000;
    let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let event = decode(object_with([format!(r#""data":{nested}"#)]).as_bytes()).unwrap();
    assert_eq!(event.data_bytes().len(), 2 * depth);
    assert_eq!(decode(&encode(&event).unwrap()).unwrap(), event);

    let (field, reason) = decode_error(&object_with([format!(r#""deep":{nested}"#)]));
    assert_eq!(field, "deep");
    assert!(reason.contains("not an array"), "{reason}");
    let objects = format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
    let (field, reason) = decode_error(&object_with([format!(r#""deep":{objects}"#)]));
    assert_eq!(field, "deep");
    assert!(reason.contains("not an object"), "{reason}");
}

#[test]
fn with_header_refuses_what_decoding_would_refuse() {
    let invalid = |result: Result<EventEnvelope>| match result {
        Err(Error::InvalidInput { reason, .. }) => reason,
        other => panic!("expected InvalidInput, got {other:?}"),
    };
    let event = EventEnvelope::new("a.b", &1).unwrap();
    let reason = invalid(
        event
            .clone()
            .with_header("n".repeat(MAX_EXTENSION_NAME_LEN + 1), "v"),
    );
    assert!(reason.contains("MAX_EXTENSION_NAME_LEN"), "{reason}");
    let reason = invalid(
        event
            .clone()
            .with_header("tenant", "v".repeat(MAX_EXTENSION_VALUE_LEN + 1)),
    );
    assert!(reason.contains("MAX_EXTENSION_VALUE_LEN"), "{reason}");

    let mut full = event;
    for i in 0..MAX_EXTENSIONS {
        full = full.with_header(format!("k{i}"), "v").unwrap();
    }
    // Replacing a header is fine; one more is not.
    let full = full.with_header("k0", "w").unwrap();
    let reason = invalid(full.clone().with_header("extra", "v"));
    assert!(reason.contains("MAX_EXTENSIONS"), "{reason}");
    assert_eq!(decode(&encode(&full).unwrap()).unwrap(), full);
}

#[test]
fn encode_refuses_headers_over_the_limits() {
    let mut event = EventEnvelope::new("a.b", &1).unwrap();
    // Past `with_header`, as an envelope read from an old store could be.
    event
        .fields_mut()
        .headers
        .insert("tenant".into(), "v".repeat(MAX_EXTENSION_VALUE_LEN + 1));
    match encode(&event) {
        Err(Error::Encode { reason }) => {
            assert!(reason.contains("MAX_EXTENSION_VALUE_LEN"), "{reason}");
        }
        other => panic!("expected an encode error, got {other:?}"),
    }
}

/// Input over the largest event size (64 MiB) is refused before it is parsed, with a
/// decode error naming the limit.
#[test]
fn input_over_the_largest_event_size_is_refused_unparsed() {
    // A valid event, whose payload alone is at the limit.
    let mut huge = br#"{"specversion":"1.0","id":"1","source":"s","type":"a.b","data":""#.to_vec();
    huge.resize(huge.len() + crate::MaxEventSize::MAX.bytes(), b'x');
    huge.extend_from_slice(br#""}"#);
    let error = decode(&huge).unwrap_err();
    assert_eq!(error.decode_field(), Some("$"), "{error}");
    assert!(error.to_string().contains("maximum event size"), "{error}");
}

#[test]
fn a_json_payload_is_written_verbatim_last_and_counted_exactly() {
    for event in [
        full_event(),
        EventEnvelope::new("a.b", &json!({"n": 1})).unwrap(),
        EventEnvelope::from_bytes("a.b", "application/json", &b"[1, 2]"[..]).unwrap(),
        EventEnvelope::from_bytes("a.b", "application/octet-stream", vec![1u8, 2, 3]).unwrap(),
        EventEnvelope::from_bytes("a.b", "application/json", Vec::new()).unwrap(),
    ] {
        let wire = encode(&event).unwrap();
        assert_eq!(wire.len(), encoded_len(&event), "{event:?}");
        assert_eq!(decode(&wire).unwrap(), event);
        if is_json_content_type(event.content_type()) && !event.data_bytes().is_empty() {
            let tail = [&b",\"data\":"[..], &event.data_bytes()[..], b"}"].concat();
            assert!(wire.ends_with(&tail), "{}", String::from_utf8_lossy(&wire));
        }
    }
}

#[test]
fn bytes_given_as_json_are_checked_whatever_the_event_held_before() {
    // A valid JSON event whose payload is then replaced by bytes that are not JSON.
    let replaced = EventEnvelope::new("a.b", &json!({"n": 1}))
        .unwrap()
        .with_data_bytes("application/json", &b"{nope"[..]);
    assert!(matches!(encode(&replaced), Err(Error::Encode { .. })));
    // Read back from the binary codec, bytes are not trusted as JSON either.
    let binary = crate::codec::Bincode;
    let stored = crate::codec::Codec::encode(
        &binary,
        &EventEnvelope::from_bytes("a.b", "application/json", &b"{nope"[..]).unwrap(),
    )
    .unwrap();
    let read = crate::codec::Codec::decode(&binary, &stored).unwrap();
    assert!(matches!(encode(&read), Err(Error::Encode { .. })));
}
