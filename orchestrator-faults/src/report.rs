//! The one `result …` line each scenario prints on stdout for xtask to read.

use std::fmt::Display;

/// A scenario's figures, printed as `result scenario=<s> target=<t> key=value …`.
#[derive(Debug)]
pub(crate) struct Report {
    /// `key=value` pairs, in the order added.
    fields: Vec<(&'static str, String)>,
}

/// `text` with the characters that would break a `key=value` line replaced.
pub(crate) fn value(text: &str) -> String {
    let cleaned: String = text
        .chars()
        .map(|c| {
            if c.is_whitespace() || c == '=' {
                '_'
            } else {
                c
            }
        })
        .collect();
    if cleaned.is_empty() {
        "-".to_owned()
    } else {
        cleaned
    }
}

impl Report {
    /// A report of `scenario` on `target` (a backend or store name).
    pub(crate) fn new(scenario: &str, target: &str) -> Self {
        Self {
            fields: vec![("scenario", value(scenario)), ("target", value(target))],
        }
    }

    /// Adds a figure.
    pub(crate) fn add(&mut self, key: &'static str, figure: impl Display) -> &mut Self {
        self.fields.push((key, value(&figure.to_string())));
        self
    }

    /// Prints the line, marked passed.
    pub(crate) fn print(&self) {
        let fields: Vec<String> = self
            .fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("result passed {}", fields.join(" "));
    }
}

#[cfg(test)]
mod tests {
    use super::{Report, value};

    #[test]
    fn values_stay_one_word() {
        assert_eq!(value("a b=c"), "a_b_c");
        assert_eq!(value(""), "-");
        let mut report = Report::new("restart", "redis");
        report.add("lost", 0).add("note", "broker back after 1.2s");
        assert_eq!(report.fields.len(), 4);
        assert_eq!(report.fields[3].1, "broker_back_after_1.2s");
    }
}
