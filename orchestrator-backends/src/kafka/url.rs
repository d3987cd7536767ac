//! `kafka://` URLs: the brokers, and TLS/SASL settings in the query
//! ([`KafkaConfig::from_url`]).

use orchestrator_core::{Error, Result};

use super::config::KafkaConfig;

/// The librdkafka properties a `kafka://` URL's query may set: the connection's security and
/// the client id. Anything else is refused, so that a typo (`sasl.pasword`) fails at start-up
/// instead of connecting without the setting; other properties go through
/// [`KafkaConfig::with_property`].
pub const URL_QUERY_KEYS: &[&str] = &[
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "ssl.key.password",
    "ssl.endpoint.identification.algorithm",
    "client.id",
];

/// Whether a librdkafka property holds a secret (its value is never printed).
pub(crate) fn is_secret_key(key: &str) -> bool {
    ["password", "secret", "pem", "oauthbearer.config", "jaas"]
        .iter()
        .any(|s| key.contains(s))
}

/// `url` with the password of its user info replaced by `***` (as
/// [`orchestrator_core::redact::redact_url`] does) and the values of secret query parameters
/// (`sasl.password`, `ssl.key.password`, …) and of unknown ones too; for messages and logs.
///
/// ```
/// use orchestrator_backends::kafka::redact_url;
///
/// assert_eq!(
///     redact_url("kafka://b:9092?sasl.username=app&sasl.password=s3&cret"),
///     "kafka://b:9092?sasl.username=app&sasl.password=***"
/// );
/// ```
///
/// An unescaped `&` in a secret value (as above) makes the rest look like a parameter of its
/// own: after a secret, everything up to the next known key is dropped. A parameter whose key
/// does not look like a property name (`a.b_c`) is shown as `…`.
pub fn redact_url(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return orchestrator_core::redact::redact_url(url);
    };
    // The user info ends before the query: an `@` in a query value is not its end.
    let base = orchestrator_core::redact::redact_url(base);
    let mut shown = Vec::new();
    let mut hiding = false;
    for pair in query.split('&') {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        let known = URL_QUERY_KEYS.contains(&key);
        if hiding && !known {
            continue;
        }
        hiding = is_secret_key(key);
        shown.push(if known && !hiding {
            pair.to_owned()
        } else if looks_like_a_key(key) {
            format!("{key}=***")
        } else {
            "…".to_owned()
        });
    }
    format!("{base}?{}", shown.join("&"))
}

/// Whether `text` looks like a librdkafka property name, so that showing it in a message
/// cannot show a secret pasted in its place.
fn looks_like_a_key(text: &str) -> bool {
    text.contains('.')
        && text.len() <= 64
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '_')
}

/// A key for a message: itself if it looks like one, else `…`.
fn key_of(text: &str) -> &str {
    if looks_like_a_key(text) { text } else { "…" }
}

impl KafkaConfig {
    /// A config from a `kafka://host:port[,host:port…][/][?key=value&…]` URL: the brokers,
    /// and the librdkafka properties of [`URL_QUERY_KEYS`] (TLS and SASL) for every client.
    /// Values are percent-decoded: write `%26` for `&`, `%3D` for `=`, `%25` for `%`, `%23`
    /// for `#`, `%2B` for `+` (a `+` is kept as it is).
    ///
    /// ```
    /// use orchestrator_backends::kafka::KafkaConfig;
    ///
    /// let config = KafkaConfig::from_url(
    ///     "kafka://b1:9093,b2:9093?security.protocol=SASL_SSL&sasl.mechanism=SCRAM-SHA-256\
    ///      &sasl.username=app&sasl.password=p%26ss&ssl.ca.location=/etc/kafka/ca.pem",
    /// )?;
    /// assert_eq!(config.brokers(), "b1:9093,b2:9093");
    /// assert_eq!(config.property("sasl.password"), Some("p&ss"));
    /// assert!(!format!("{config:?}").contains("p&ss"));
    /// assert!(KafkaConfig::from_url("kafka://b:9092?sasl.pasword=x").is_err());
    /// # Ok::<(), orchestrator_core::Error>(())
    /// ```
    ///
    /// Fails with [`Error::InvalidInput`] (never showing a secret value) when the scheme is
    /// not `kafka`, no broker is named, the brokers carry user info (put credentials in
    /// `sasl.username` / `sasl.password`), or a query parameter is unknown, repeated, empty,
    /// badly percent-encoded, or holds a `security.protocol` / `sasl.mechanism` this build
    /// does not support.
    pub fn from_url(url: &str) -> Result<Self> {
        let invalid = |reason: String| {
            Error::invalid("Kafka URL", format!("`{}`: {reason}", redact_url(url)))
        };
        let rest = url.trim().strip_prefix("kafka://").ok_or_else(|| {
            invalid("expected kafka://host:port[,host:port…][?key=value&…]".into())
        })?;
        let (brokers, query) = rest.split_once('?').unwrap_or((rest, ""));
        let brokers = brokers.trim_end_matches('/');
        if brokers.is_empty() {
            return Err(invalid(
                "name the brokers: kafka://127.0.0.1:9092[,host:port…]".into(),
            ));
        }
        if brokers.contains('@') {
            return Err(Error::invalid(
                "Kafka URL",
                "user info in a kafka:// URL is not read: pass credentials as \
                 ?sasl.username=…&sasl.password=… (with security.protocol and sasl.mechanism)",
            ));
        }
        let mut config = Self::new(brokers);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| invalid(format!("`{}` has no `=value`", key_of(pair))))?;
            let key = percent_decode(key).map_err(|e| invalid(format!("a key: {e}")))?;
            if !URL_QUERY_KEYS.contains(&key.as_str()) {
                return Err(invalid(format!(
                    "unknown query parameter `{}`; a kafka:// URL takes {} (set other \
                     librdkafka properties with KafkaConfig::with_property)",
                    key_of(&key),
                    URL_QUERY_KEYS.join(", ")
                )));
            }
            let value = percent_decode(value).map_err(|e| invalid(format!("`{key}`: {e}")))?;
            if value.is_empty() {
                return Err(invalid(format!("`{key}` is empty")));
            }
            let canonical = if key == "sasl.mechanisms" {
                "sasl.mechanism"
            } else {
                key.as_str()
            };
            if config.properties.contains_key(canonical) {
                return Err(invalid(format!("`{key}` is given twice")));
            }
            check_value(canonical, &value).map_err(invalid)?;
            config.properties.insert(canonical.to_owned(), value);
        }
        Ok(config)
    }
}

/// The values librdkafka (built with OpenSSL, without Cyrus SASL) accepts for the enumerated
/// settings; others are left to librdkafka.
fn check_value(key: &str, value: &str) -> std::result::Result<(), String> {
    match key {
        "security.protocol" => {
            let known = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];
            if known.iter().any(|k| k.eq_ignore_ascii_case(value)) {
                Ok(())
            } else {
                Err(format!(
                    "`security.protocol={value}`: expected one of {}",
                    known.join(", ")
                ))
            }
        }
        "sasl.mechanism" => {
            let known = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"];
            if known.contains(&value) {
                Ok(())
            } else if value == "GSSAPI" {
                Err(
                    "`sasl.mechanism=GSSAPI` (Kerberos) needs Cyrus SASL, which this build of \
                     librdkafka does not include"
                        .into(),
                )
            } else {
                Err(format!(
                    "`sasl.mechanism={value}`: expected one of {}",
                    known.join(", ")
                ))
            }
        }
        "ssl.endpoint.identification.algorithm" if value != "none" && value != "https" => Err(
            format!("`{key}={value}`: expected `https` (check the broker's host name) or `none`"),
        ),
        _ => Ok(()),
    }
}

/// `%XX` decoding; the result must be UTF-8.
fn percent_decode(text: &str) -> std::result::Result<String, &'static str> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a `%` not followed by two hex digits (write `%25` for `%`)")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent-encoding that is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(url: &str) -> String {
        match KafkaConfig::from_url(url) {
            Err(Error::InvalidInput { .. }) => KafkaConfig::from_url(url).unwrap_err().to_string(),
            other => panic!("{url}: expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn brokers_and_security_settings_are_read() {
        let config = KafkaConfig::from_url(
            "kafka://a:9093,b:9093/?security.protocol=SASL_SSL&sasl.mechanisms=SCRAM-SHA-512\
             &sasl.username=app&sasl.password=p%40ss%26w%3Drd%25+&ssl.ca.location=%2Fca.pem\
             &client.id=shop",
        )
        .unwrap();
        assert_eq!(config.brokers(), "a:9093,b:9093");
        assert_eq!(config.property("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.property("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(config.property("sasl.password"), Some("p@ss&w=rd%+"));
        assert_eq!(config.property("ssl.ca.location"), Some("/ca.pem"));
        // Every client gets them.
        assert_eq!(config.producer().get("sasl.username"), Some("app"));
        assert_eq!(
            config.group_consumer("g").get("sasl.password"),
            Some("p@ss&w=rd%+")
        );
        assert_eq!(config.admin().get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.lease_consumer("g").get("client.id"), Some("shop"));
        // No query at all: just brokers, as before.
        let plain = KafkaConfig::from_url("kafka://127.0.0.1:9092").unwrap();
        assert_eq!(plain.brokers(), "127.0.0.1:9092");
        assert_eq!(plain.property("security.protocol"), None);
    }

    #[test]
    fn bad_urls_are_refused_with_what_to_fix() {
        assert!(reason("redis://h:1").contains("expected kafka://"));
        assert!(reason("kafka://").contains("name the brokers"));
        assert!(reason("kafka://?security.protocol=ssl").contains("name the brokers"));
        let unknown = reason("kafka://b:9092?sasl.pasword=x");
        assert!(
            unknown.contains("unknown query parameter `sasl.pasword`"),
            "{unknown}"
        );
        assert!(unknown.contains("sasl.password"), "{unknown}");
        assert!(reason("kafka://b:9092?client.id=a&client.id=b").contains("given twice"));
        assert!(
            reason("kafka://b:9092?sasl.mechanism=PLAIN&sasl.mechanisms=PLAIN")
                .contains("given twice")
        );
        assert!(reason("kafka://b:9092?client.id=").contains("empty"));
        assert!(reason("kafka://b:9092?client.id").contains("no `=value`"));
        assert!(reason("kafka://b:9092?client.id=%zz").contains("two hex digits"));
        assert!(reason("kafka://b:9092?security.protocol=tls").contains("sasl_ssl"));
        assert!(reason("kafka://b:9092?sasl.mechanism=GSSAPI").contains("Cyrus"));
        assert!(reason("kafka://b:9092?sasl.mechanism=scram").contains("SCRAM-SHA-256"));
        assert!(
            reason("kafka://b:9092?ssl.endpoint.identification.algorithm=yes").contains("none")
        );
    }

    #[test]
    fn secrets_never_show_in_errors_or_debug_output() {
        let secret = "Zq9-s3cret";
        let urls = [
            format!("kafka://u:{secret}@b:9092"),
            format!("kafka://b:9092?sasl.password={secret}&bogus=1"),
            format!("kafka://b:9092?sasl.password={secret}&sasl.password={secret}"),
            format!("kafka://b:9092?ssl.key.password={secret}&client.id=%zz"),
            format!("kafka://b:9092?sasl.password={secret}&x&client.id=a"),
            format!("kafka://b:9092?security.protocol=nope&sasl.password={secret}"),
            format!("kafka://b:9092?{secret}"),
        ];
        for url in &urls {
            let error = KafkaConfig::from_url(url).unwrap_err();
            for text in [error.to_string(), format!("{error:?}")] {
                assert!(!text.contains(secret), "{url}: {text}");
            }
        }
        let config = KafkaConfig::from_url(&format!(
            "kafka://b:9092?sasl.password={secret}&ssl.key.password={secret}"
        ))
        .unwrap();
        assert!(!format!("{config:?}").contains(secret));
        assert_eq!(
            redact_url(&format!(
                "kafka://b:9092?sasl.password={secret}&client.id=c"
            )),
            "kafka://b:9092?sasl.password=***&client.id=c"
        );
        assert_eq!(
            redact_url(&format!("kafka://u:{secret}@b:9092?sasl.password={secret}")),
            "kafka://u:***@b:9092?sasl.password=***"
        );
        assert_eq!(
            redact_url(&format!("kafka://u:{secret}@b:9092")),
            "kafka://u:***@b:9092"
        );
    }

    #[test]
    fn librdkafka_accepts_every_protocol_and_mechanism_the_url_does() {
        use rdkafka::producer::BaseProducer;
        // Built without OpenSSL, librdkafka refuses `ssl`, `sasl_ssl` and SCRAM when the
        // client is created ("OpenSSL not available at build time").
        for protocol in ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] {
            for mechanism in ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] {
                let config = KafkaConfig::from_url(&format!(
                    "kafka://127.0.0.1:1?security.protocol={protocol}\
                     &sasl.mechanism={mechanism}&sasl.username=u&sasl.password=p"
                ))
                .unwrap();
                if let Err(error) = config.producer().create::<BaseProducer>() {
                    panic!("{protocol} with {mechanism}: {error}");
                }
            }
        }
    }

    #[test]
    fn configuration_errors_hide_secret_values() {
        use rdkafka::producer::BaseProducer;
        // librdkafka refuses a property it does not know, naming it and its value.
        let config =
            KafkaConfig::new("b:9092").with_property("ssl.keystore.password.x", "Zq9-s3cret");
        let Err(error) = config.producer().create::<BaseProducer>() else {
            panic!("librdkafka accepted an unknown property")
        };
        let error = super::super::client::kafka_error(error);
        for text in [error.to_string(), format!("{error:?}")] {
            assert!(!text.contains("Zq9-s3cret"), "{text}");
            assert!(text.contains("ssl.keystore.password.x"), "{text}");
        }
    }
}
