//! Where a service listens, read from the URLs the tests use.

use std::fmt;
use std::net::IpAddr;

use crate::Result;

/// Where a service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// Host name or IP address, without IPv6 brackets.
    pub(crate) host: String,
    /// TCP port.
    pub(crate) port: u16,
    /// Whether the scheme asks for TLS, which xtask cannot speak.
    pub(crate) tls: bool,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Endpoint {
    /// Whether the service runs on this machine, so xtask may start or stop it.
    pub(crate) fn is_local(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

/// Reads host and port from a URL such as `amqp://user:pass@host:5672/vhost`.
///
/// `schemes` lists the accepted schemes with their default port and whether
/// they use TLS. User, password, path and query are ignored.
pub(crate) fn parse_url(url: &str, schemes: &[(&str, u16, bool)]) -> Result<Endpoint> {
    let accepted = || {
        let names: Vec<String> = schemes.iter().map(|(s, ..)| format!("{s}://")).collect();
        names.join(" or ")
    };
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("`{url}` is not a URL; expected {}host:port", accepted()))?;
    let &(_, default_port, tls) = schemes
        .iter()
        .find(|(name, ..)| name.eq_ignore_ascii_case(scheme))
        .ok_or_else(|| {
            format!(
                "`{url}`: unsupported scheme `{scheme}`, expected {}",
                accepted()
            )
        })?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let (host, port) = match host_port.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("`{url}`: unclosed `[` in the host"))?;
            let port = match after {
                "" => None,
                after => Some(after.strip_prefix(':').ok_or_else(|| {
                    format!("`{url}`: expected `:port` after `]`, found `{after}`")
                })?),
            };
            (host, port)
        }
        None => match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        },
    };
    let port = match port {
        None => default_port,
        Some(port) => port
            .parse()
            .map_err(|_| format!("`{url}`: `{port}` is not a valid port"))?,
    };
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    Ok(Endpoint {
        host: host.to_owned(),
        port,
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::{Endpoint, parse_url};

    fn endpoint(host: &str, port: u16) -> Endpoint {
        Endpoint {
            host: host.to_owned(),
            port,
            tls: false,
        }
    }

    #[test]
    fn display_brackets_ipv6() {
        assert_eq!(endpoint("::1", 6379).to_string(), "[::1]:6379");
        assert_eq!(endpoint("127.0.0.2", 1).to_string(), "127.0.0.2:1");
        assert_eq!(endpoint("redis", 1).to_string(), "redis:1");
    }

    #[test]
    fn only_loopback_is_local() {
        for host in ["::1", "127.0.0.1", "127.0.0.2", "localhost", "LocalHost"] {
            assert!(endpoint(host, 1).is_local(), "{host}");
        }
        for host in ["10.1.1.1", "redis", "::2", "example.com"] {
            assert!(!endpoint(host, 1).is_local(), "{host}");
        }
    }

    #[test]
    fn unsupported_scheme_names_the_expected_ones() {
        let message = parse_url("ftp://x", &[("amqp", 1, false), ("amqps", 2, true)])
            .err()
            .unwrap_or_default();
        assert!(message.contains("amqp:// or amqps://"), "{message}");
    }
}
