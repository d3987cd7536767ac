//! TLS and SASL settings reach librdkafka, and librdkafka can use them (it is built with
//! OpenSSL): a `kafka://` URL whose query asks for TLS makes the client open its connection
//! to the broker with a TLS handshake, and one without opens it with a Kafka request. The
//! "broker" is a TCP listener of the test's own that records the first bytes it receives, so
//! no Kafka broker is needed.
#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::net::TcpListener;
use std::time::Duration;

use orchestrator_backends::kafka::{KafkaConfig, KafkaTransport};

/// The first bytes the client sends to a listener at the URL `kafka://127.0.0.1:<port>?<query>`.
async fn first_bytes(query: &str) -> [u8; 3] {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = format!("kafka://127.0.0.1:{port}?{query}");
    let config = KafkaConfig::from_url(&url)
        .unwrap()
        .with_operation_timeout(Duration::from_secs(2));
    let accepted = std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut bytes = [0_u8; 3];
        socket.read_exact(&mut bytes).map(|()| bytes)
    });
    // The listener never answers like a broker: connecting fails, after the bytes are sent.
    let connected = tokio::time::timeout(Duration::from_secs(30), KafkaTransport::connect(config))
        .await
        .expect("connect neither failed nor succeeded within 30 s");
    assert!(
        connected.is_err(),
        "connected to a listener that is no broker"
    );
    accepted
        .join()
        .unwrap()
        .expect("the client sent nothing within 10 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_asking_for_tls_makes_the_client_speak_tls() {
    // A TLS record: handshake (22), protocol version 3.x.
    let tls = first_bytes("security.protocol=SSL&ssl.endpoint.identification.algorithm=none").await;
    assert_eq!(tls[..2], [0x16, 0x03], "not a TLS handshake: {tls:?}");
    // SASL over TLS starts with TLS too.
    let sasl_ssl = first_bytes(
        "security.protocol=SASL_SSL&sasl.mechanism=SCRAM-SHA-512&sasl.username=u\
         &sasl.password=p&ssl.endpoint.identification.algorithm=none",
    )
    .await;
    assert_eq!(
        sasl_ssl[..2],
        [0x16, 0x03],
        "not a TLS handshake: {sasl_ssl:?}"
    );
    // Without: a Kafka request, whose 4-byte big-endian size starts with a zero byte.
    let plain = first_bytes("client.id=plain").await;
    assert_eq!(plain[0], 0, "not a Kafka request: {plain:?}");
}
