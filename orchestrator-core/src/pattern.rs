//! Topic patterns: `user.created` (exact), `user.*` (one segment), `order.#` (any depth).
//!
//! Topics and patterns are dot-separated segments. `*` matches exactly one segment; `#`,
//! allowed only as the last segment, matches zero or more segments. These are a subset of
//! AMQP topic-exchange semantics, so RabbitMQ carries patterns unchanged; other backends
//! translate them (see their module docs, and [`TopicPattern::to_regex`]).
//!
//! ```
//! use orchestrator_core::TopicPattern;
//!
//! let p = TopicPattern::parse("order.#")?;
//! assert!(p.matches("order") && p.matches("order.placed") && p.matches("order.line.added"));
//! assert!(!p.matches("orders.placed"));
//! assert!(TopicPattern::parse("user.*")?.matches("user.created"));
//! assert!(TopicPattern::parse("user.cre*").is_err());
//! # Ok::<(), orchestrator_core::Error>(())
//! ```

use std::fmt;

use crate::error::{Error, Result};

/// One segment of a pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    /// This exact text.
    Literal(String),
    /// Exactly one segment (`*`).
    One,
    /// Zero or more segments (`#`).
    Any,
}

/// A parsed topic pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicPattern {
    text: String,
    segments: Vec<Segment>,
}

impl TopicPattern {
    /// Parses a pattern. `*` and `#` must stand alone as whole segments, `#` only as the
    /// last one; segments must not be empty.
    pub fn parse(pattern: &str) -> Result<Self> {
        let bad = |reason: String| {
            Err(Error::invalid(
                "topic pattern",
                format!("`{pattern}`: {reason}"),
            ))
        };
        if pattern.is_empty() {
            return bad("is empty; use `#` to match every topic".into());
        }
        if pattern.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return bad("contains whitespace".into());
        }
        let parts: Vec<&str> = pattern.split('.').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, seg) in parts.iter().enumerate() {
            let s = match *seg {
                "" => return bad(format!("segment {} is empty", i + 1)),
                "*" => Segment::One,
                "#" if i + 1 == parts.len() => Segment::Any,
                "#" => {
                    return bad(
                        "`#` may only be the last segment (it matches any remaining depth)".into(),
                    );
                }
                s if s.contains(['*', '#']) => {
                    return bad(format!(
                        "`{s}` mixes text with a wildcard; `*` and `#` must be whole segments"
                    ));
                }
                s => Segment::Literal(s.to_owned()),
            };
            segments.push(s);
        }
        Ok(Self {
            text: pattern.to_owned(),
            segments,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parsed segments.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Whether the pattern has no wildcard (it names one topic).
    pub fn is_exact(&self) -> bool {
        self.segments
            .iter()
            .all(|s| matches!(s, Segment::Literal(_)))
    }

    /// Whether `topic` matches.
    pub fn matches(&self, topic: &str) -> bool {
        let parts: Vec<&str> = topic.split('.').collect();
        match_from(&self.segments, &parts)
    }

    /// The pattern as an anchored regular expression over topic names (for backends such as
    /// Kafka that subscribe by regex).
    pub fn to_regex(&self) -> String {
        let mut out = String::from("^");
        let mut first = true;
        for seg in &self.segments {
            match seg {
                Segment::Literal(s) => {
                    if !first {
                        out.push_str("\\.");
                    }
                    out.push_str(&regex_escape(s));
                }
                Segment::One => {
                    if !first {
                        out.push_str("\\.");
                    }
                    out.push_str("[^.]+");
                }
                Segment::Any => {
                    if first {
                        out.push_str("([^.]+(\\.[^.]+)*)?");
                    } else {
                        out.push_str("(\\.[^.]+)*");
                    }
                }
            }
            first = false;
        }
        out.push('$');
        out
    }
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn match_from(pattern: &[Segment], topic: &[&str]) -> bool {
    match pattern.split_first() {
        None => topic.is_empty(),
        Some((Segment::Any, rest)) => {
            (0..=topic.len()).any(|skip| match_from(rest, &topic[skip..]))
        }
        Some((Segment::One, rest)) => !topic.is_empty() && match_from(rest, &topic[1..]),
        Some((Segment::Literal(l), rest)) => {
            topic.first().is_some_and(|t| t == l) && match_from(rest, &topic[1..])
        }
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for TopicPattern {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, t: &str) -> bool {
        TopicPattern::parse(p).unwrap().matches(t)
    }

    #[test]
    fn matching_rules() {
        assert!(m("user.created", "user.created"));
        assert!(!m("user.created", "user.created.v2"));
        assert!(m("user.*", "user.created"));
        assert!(!m("user.*", "user"));
        assert!(!m("user.*", "user.a.b"));
        assert!(m("#", "anything.at.all"));
        assert!(m("order.#", "order"));
        assert!(m("order.#", "order.a.b"));
        assert!(!m("order.#", "orders"));
        assert!(m("*.created", "user.created"));
        assert!(m("*.*.#", "a.b"));
        assert!(!m("*.*.#", "a"));
    }

    #[test]
    fn bad_patterns_are_typed_errors() {
        for p in [
            "", "a..b", "a.b*", "a.#b", ".a", "a b", "#.a", "a.#.b", "a.",
        ] {
            assert!(
                matches!(TopicPattern::parse(p), Err(Error::InvalidInput { .. })),
                "{p}"
            );
        }
    }

    #[test]
    fn regex_form() {
        assert_eq!(
            TopicPattern::parse("user.*").unwrap().to_regex(),
            "^user\\.[^.]+$"
        );
        assert_eq!(
            TopicPattern::parse("order.#").unwrap().to_regex(),
            "^order(\\.[^.]+)*$"
        );
        assert_eq!(
            TopicPattern::parse("#").unwrap().to_regex(),
            "^([^.]+(\\.[^.]+)*)?$"
        );
    }
}
