//! Whether the broker a benchmark or fault scenario needs answers, asked with the
//! service's own readiness probe from [`services`](crate::services).

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::services::{Health, SERVICES};

/// Where Kafka is when `ORCHESTRATOR_KAFKA_BROKERS` is unset.
const DEFAULT_KAFKA_BROKERS: &str = "127.0.0.1:9092";

/// Whether this run is CI (`CI=true` or `1`), where a service that cannot be reached fails
/// what needs it instead of skipping it.
pub(crate) fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// `Ok(how it answered)` if the service called `name` (`redis`, `rabbitmq`, `kafka`)
/// answers, else `Err(why not)`, both naming the address.
pub(crate) fn service(name: &str) -> Result<String, String> {
    match SERVICES.iter().find(|s| s.name == name) {
        Some(service) => {
            let url = std::env::var(service.env)
                .ok()
                .filter(|url| !url.trim().is_empty())
                .unwrap_or_else(|| service.default_url.to_owned());
            let endpoint = (service.endpoint)(url.trim())
                .map_err(|e| format!("{} ({}): {e}", service.title, service.env))?;
            match (service.probe)(&endpoint) {
                Health::Ready(how) => Ok(format!("{} at {endpoint}: {how}", service.title)),
                Health::Down(why) => {
                    Err(format!("{} at {endpoint} is down ({why})", service.title))
                }
            }
        }
        // A checkout whose services have no `kafka` row: an open port will do.
        None if name == "kafka" => kafka_port(),
        None => Err(format!("no service called `{name}` is known to xtask")),
    }
}

/// Whether the Kafka broker at `address` (`host:port`) answers, with the `kafka` service's
/// probe when xtask has one, else by accepting a connection.
pub(crate) fn kafka_at(address: &str) -> Result<String, String> {
    match SERVICES.iter().find(|s| s.name == "kafka") {
        Some(service) => {
            let endpoint = (service.endpoint)(address)?;
            match (service.probe)(&endpoint) {
                Health::Ready(how) => Ok(how),
                Health::Down(why) => Err(why),
            }
        }
        None => {
            let addr = address
                .to_socket_addrs()
                .map_err(|e| e.to_string())?
                .next()
                .ok_or("no address")?;
            TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                .map(|_| "port open".to_owned())
                .map_err(|e| e.to_string())
        }
    }
}

/// Whether the first broker of `ORCHESTRATOR_KAFKA_BROKERS` accepts connections.
fn kafka_port() -> Result<String, String> {
    let brokers = std::env::var("ORCHESTRATOR_KAFKA_BROKERS")
        .ok()
        .filter(|b| !b.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_KAFKA_BROKERS.to_owned());
    let first = brokers.split(',').next().unwrap_or_default().trim();
    let first = first.strip_prefix("kafka://").unwrap_or(first).to_owned();
    let addrs = first
        .to_socket_addrs()
        .map_err(|e| format!("Kafka at {first}: cannot resolve ({e})"))?;
    for addr in addrs {
        if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            return Ok(format!("Kafka at {first}: port open"));
        }
    }
    Err(format!("Kafka at {first} is down (connection refused)"))
}
