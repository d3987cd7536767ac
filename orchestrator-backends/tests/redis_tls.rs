//! `rediss://` (feature `redis-tls`) against a redis-server of the test's own, listening on TLS
//! only, with a certificate from a CA the test makes with `openssl`: publish/subscribe and a
//! store append/read over TLS when the CA is trusted; refused with a certificate error when it
//! is not.
//!
//! Skipped with a printed reason when `redis-server` or `openssl` is missing or the server was
//! built without TLS, except under `CI=true`, where that fails the test.
#![cfg(feature = "redis-tls")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use orchestrator_backends::redis::{RedisConfig, RedisEventStore, RedisTransport};
use orchestrator_core::testkit::services;
use orchestrator_core::{EventEnvelope, EventStore, ExpectedVersion, SubscribeOptions, Transport};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const WAIT: Duration = Duration::from_secs(20);

/// Skips (prints why) or, under `CI=true`, fails.
fn skip(reason: &str) {
    if services::is_ci() {
        panic!("CI=true: the Redis TLS test cannot run: {reason}");
    }
    eprintln!("skipping: {reason}");
}

/// Runs `openssl` with `args` in `dir`; `Err` with its output when it fails.
fn openssl(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("openssl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A CA (`<name>.crt`, `<name>.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) -> Result<(), String> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
    )
}

/// `server.crt` / `server.key` for 127.0.0.1, signed by the CA `ca`.
fn make_server_cert(dir: &Path, ca: &str) -> Result<(), String> {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    )?;
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .map_err(|e| e.to_string())?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.crt",
        ],
    )
}

/// A redis-server listening on TLS only, on a spare port; killed when dropped.
struct TlsRedis {
    child: Child,
    port: u16,
}

impl TlsRedis {
    /// Starts the server and waits until it accepts connections. `Ok(None)` (after
    /// [`skip`]) when this machine cannot run it.
    async fn start(dir: &Path) -> Result<Option<Self>, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let spawned = Command::new("redis-server")
            .args(["--port", "0", "--bind", "127.0.0.1", "--tls-port"])
            .arg(port.to_string())
            .args([
                "--tls-cert-file",
                "server.crt",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                skip("redis-server is not installed");
                return Ok(None);
            }
            Err(e) => return Err(format!("redis-server: {e}")),
        };
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = String::new();
        let ready = tokio::time::timeout(WAIT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("Ready to accept connections") {
                    return true;
                }
                seen.push_str(&line);
                seen.push('\n');
            }
            false
        })
        .await;
        match ready {
            Ok(true) => {
                // Keep draining the log so the server never blocks on a full pipe.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                Ok(Some(Self { child, port }))
            }
            // A redis-server built without TLS does not know `tls-port`.
            Ok(false) if seen.contains("Bad directive") => {
                skip(&format!("this redis-server has no TLS support:\n{seen}"));
                Ok(None)
            }
            Ok(false) => Err(format!("redis-server exited:\n{seen}")),
            Err(_) => Err(format!("redis-server not ready within {WAIT:?}:\n{seen}")),
        }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        // Our own child, by its handle.
        let _ = self.child.start_kill();
    }
}

/// The CA `ca` and a server certificate it signed, plus a second CA `other` that signed
/// nothing; `None` (after [`skip`]) without `openssl`.
fn certificates(dir: &Path) -> Option<()> {
    let made = make_ca(dir, "ca")
        .and_then(|()| make_server_cert(dir, "ca"))
        .and_then(|()| make_ca(dir, "other"));
    match made {
        Ok(()) => Some(()),
        Err(e) if e.starts_with("openssl: ") => {
            skip(&format!("cannot run openssl ({e})"));
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn config(url: &str, ca_pem: Vec<u8>) -> RedisConfig {
    RedisConfig::new(url)
        .unwrap()
        .with_tls_root_certificates(ca_pem)
        .unwrap()
        .with_prefix(format!("tls-test:{}:", uuid::Uuid::now_v7().simple()))
        .with_retry_for(Duration::from_millis(500))
        .with_connection_timeout(Duration::from_secs(3))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_carries_the_bus_and_the_store_and_refuses_an_untrusted_server() {
    let dir = tempfile::tempdir().unwrap();
    if certificates(dir.path()).is_none() {
        return;
    }
    let Some(server) = TlsRedis::start(dir.path()).await.unwrap() else {
        return;
    };
    let url = server.url();
    let ca = std::fs::read(dir.path().join("ca.crt")).unwrap();

    // Trusted: publish/subscribe.
    let transport = RedisTransport::connect(config(&url, ca.clone()))
        .await
        .unwrap();
    let mut sub = transport
        .subscribe(SubscribeOptions::new("tls-readers", "secure.ping").unwrap())
        .await
        .unwrap();
    let sent = EventEnvelope::new("secure.ping", &serde_json::json!({ "n": 1 })).unwrap();
    transport
        .publish("secure.ping", sent.clone())
        .await
        .unwrap();
    let delivery = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("no delivery over TLS within 20 s")
        .unwrap()
        .expect("the subscription ended");
    assert_eq!(delivery.event(), &sent);
    delivery.ack().await.unwrap();
    transport.close().await;

    // Trusted: a store append and read.
    let store = RedisEventStore::connect(config(&url, ca.clone()))
        .await
        .unwrap();
    let event = EventEnvelope::new("account.opened", &serde_json::json!({ "id": 7 })).unwrap();
    store
        .append("account-7", ExpectedVersion::NoStream, vec![event.clone()])
        .await
        .unwrap();
    let read = store.read_stream("account-7", 1, 10).await.unwrap();
    let ids: Vec<_> = read.iter().map(|e| e.id().clone()).collect();
    assert_eq!(ids, vec![event.id().clone()]);
    assert_eq!(read[0].data::<serde_json::Value>().unwrap()["id"], 7);

    // Untrusted: a CA that did not sign the server's certificate, and the system's roots.
    let other = std::fs::read(dir.path().join("other.crt")).unwrap();
    let untrusted = [
        config(&url, other),
        RedisConfig::new(&url)
            .unwrap()
            .with_retry_for(Duration::from_millis(500))
            .with_connection_timeout(Duration::from_secs(3)),
    ];
    for config in untrusted {
        let refused = tokio::time::timeout(WAIT, RedisEventStore::connect(config))
            .await
            .expect("an untrusted server: neither refused nor accepted within 20 s");
        let Err(error) = refused else {
            panic!("connected to a server whose certificate no trusted CA signed")
        };
        let text = error.to_string();
        eprintln!("refused, as it should be: {text}");
        assert!(
            text.contains("certificate") || text.contains("UnknownIssuer"),
            "not a certificate error: {text}"
        );
    }
    drop(server);
}
