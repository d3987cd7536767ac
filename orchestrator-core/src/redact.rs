//! Passwords out of URLs, for error messages, logs and `Debug` output.
//!
//! ```
//! use orchestrator_core::redact::redact_url;
//!
//! assert_eq!(redact_url("redis://app:s3cr/t@cache:6379/0"), "redis://app:***@cache:6379/0");
//! assert_eq!(redact_url("redis://token@cache"), "redis://***@cache");
//! assert_eq!(redact_url("kafka://broker:9092"), "kafka://broker:9092");
//! ```

/// `url` with the secret of its user info replaced by `***`: `scheme://user:***@host…`, or
/// `scheme://***@host…` when the user info has no `:` (Redis reads a lone user info as the
/// password).
///
/// Passwords typed into URLs are often not percent-encoded, so the user info is taken to
/// end at the **last** `@` of the URL — a `/`, `?`, `#` or `@` in a password stays hidden.
/// The price is that an `@` in a path or query hides what comes before it too: this errs
/// on the side of hiding. A URL whose part after `scheme://` starts with `/` has no user
/// info (`file:///a@b`), and a string without `://` is returned as it is.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    if rest.starts_with('/') {
        return url.to_owned();
    }
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let user_info = &rest[..at];
    let masked = match user_info.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!("{scheme}://{masked}{}", &rest[at..])
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn examples() {
        // A password of `/`: hidden, although `://` still shows a `/`.
        assert_eq!(redact_url("redis://:/@a"), "redis://:***@a");
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact_url("redis://token@h"), "redis://***@h");
        assert_eq!(redact_url("file:///a@b/c"), "file:///a@b/c");
        assert_eq!(
            redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        // What the earlier copies printed in clear: a `/`, `?` or `#` in the password.
        assert_eq!(redact_url("redis://u:pa/ss@h/0"), "redis://u:***@h/0");
        assert_eq!(redact_url("amqp://u:pa?ss@h"), "amqp://u:***@h");
        assert_eq!(redact_url("amqp://u:p#a@ss@h"), "amqp://u:***@h");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    proptest! {
        /// Whatever the password holds, it is not in the result, and the host, port and
        /// path (without `@`) are.
        #[test]
        fn the_password_never_shows(
            scheme in "(redis|rediss|amqp|amqps|kafka|postgres)",
            user in "[a-zA-Z0-9._-]{0,12}",
            password in "[ -~]{1,24}",
            host in "[a-z][a-z0-9.-]{0,20}",
            port in proptest::option::of(1u16..),
            path in "(/[a-zA-Z0-9%._-]{0,10}){0,3}",
            query in proptest::option::of("[a-z]{1,5}=[a-zA-Z0-9]{0,8}"),
        ) {
            let port = port.map(|p| format!(":{p}")).unwrap_or_default();
            let query = query.map(|q| format!("?{q}")).unwrap_or_default();
            let tail = format!("@{host}{port}{path}{query}");
            let url = format!("{scheme}://{user}:{password}{tail}");
            let redacted = redact_url(&url);
            let expected = format!("{scheme}://{user}:***{tail}");
            prop_assert_eq!(&redacted, &expected);
            // A password that happens to be a piece of what is shown (the scheme's `://`, the
            // `***`, the user, host, port or path) may appear there, and only there.
            if !expected.contains(&password) {
                prop_assert!(!redacted.contains(&password), "{} shows {}", redacted, password);
            }
        }
    }
}
