//! Validation before the handler: every field error at once, each named by a JSON pointer.
//!
//! Typed commands validate themselves ([`Command::validate`](crate::Command::validate));
//! dynamic commands and queries get a [`Validator`] at registration — any
//! `Fn(&Value) -> Vec<FieldError>` closure, or a [`JsonSchemaValidator`] that reports every
//! violation of a JSON Schema.
//!
//! ```
//! use orchestrator_cqrs::{FieldErrors, JsonSchemaValidator, Validator};
//! use serde_json::json;
//!
//! let schema = JsonSchemaValidator::new(&json!({
//!     "type": "object",
//!     "required": ["name", "email"],
//!     "properties": { "age": { "type": "integer", "minimum": 0 } }
//! }))?;
//! let errors = schema.validate(&json!({ "age": -1 }));
//! let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
//! assert_eq!(fields, ["/age", "/email", "/name"]);
//!
//! let by_hand = |input: &serde_json::Value| {
//!     let mut errors = FieldErrors::new();
//!     errors.check(input["name"].is_string(), "/name", "is required");
//!     errors.check(input["age"].as_i64() >= Some(0), "/age", "must be zero or more");
//!     errors.into_vec()
//! };
//! assert_eq!(by_hand.validate(&json!({ "age": -1 })).len(), 2);
//! # Ok::<(), orchestrator_cqrs::Error>(())
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// One problem with one field of a command or query.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FieldError {
    /// The field, as a JSON pointer (RFC 6901): `"/name"`, `"/items/0/price"`; `""` is the
    /// whole input.
    pub field: String,
    /// What is wrong with it, for a person to read.
    pub message: String,
}

impl FieldError {
    /// A problem with `field` (a JSON pointer).
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = if self.field.is_empty() {
            "(input)"
        } else {
            &self.field
        };
        write!(f, "{field}: {}", self.message)
    }
}

/// Collects field errors, so a validator can check everything and report it all at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldErrors(Vec<FieldError>);

impl FieldErrors {
    /// No errors yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a problem with `field`.
    pub fn add(&mut self, field: impl Into<String>, message: impl Into<String>) -> &mut Self {
        self.0.push(FieldError::new(field, message));
        self
    }

    /// Records a problem with `field` unless `ok`.
    pub fn check(
        &mut self,
        ok: bool,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> &mut Self {
        if !ok {
            self.add(field, message);
        }
        self
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The errors recorded.
    pub fn into_vec(self) -> Vec<FieldError> {
        self.0
    }
}

impl From<FieldErrors> for Vec<FieldError> {
    fn from(errors: FieldErrors) -> Self {
        errors.0
    }
}

/// Checks a dynamic (JSON) command or query before its handler runs, returning every
/// problem found (empty: valid).
pub trait Validator: Send + Sync + 'static {
    /// Every problem with `input`.
    fn validate(&self, input: &Value) -> Vec<FieldError>;
}

impl<F> Validator for F
where
    F: Fn(&Value) -> Vec<FieldError> + Send + Sync + 'static,
{
    fn validate(&self, input: &Value) -> Vec<FieldError> {
        self(input)
    }
}

/// A [`Validator`] from a JSON Schema, reporting every violation (not just the first),
/// sorted by field. A missing required property is reported at the pointer the property
/// would have (`/email`), not at its parent object.
pub struct JsonSchemaValidator {
    validator: jsonschema::Validator,
}

impl fmt::Debug for JsonSchemaValidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonSchemaValidator")
            .finish_non_exhaustive()
    }
}

impl JsonSchemaValidator {
    /// Compiles `schema`; a schema that does not compile is an [`Error::InvalidInput`].
    pub fn new(schema: &Value) -> Result<Self> {
        let validator = jsonschema::validator_for(schema)
            .map_err(|e| Error::invalid("JSON Schema", e.to_string()))?;
        Ok(Self { validator })
    }
}

impl Validator for JsonSchemaValidator {
    fn validate(&self, input: &Value) -> Vec<FieldError> {
        let mut errors: Vec<FieldError> = self
            .validator
            .iter_errors(input)
            .map(|violation| FieldError::new(pointer_of(&violation), message_of(&violation)))
            .collect();
        errors.sort_by(|a, b| a.field.cmp(&b.field));
        errors.dedup();
        errors
    }
}

/// The JSON pointer of a violation; for a missing required property, the property's own.
fn pointer_of(violation: &jsonschema::ValidationError<'_>) -> String {
    let mut pointer = violation.instance_path().as_str().to_owned();
    if let jsonschema::error::ValidationErrorKind::Required {
        property: Value::String(name),
    } = violation.kind()
    {
        pointer.push('/');
        pointer.push_str(&name.replace('~', "~0").replace('/', "~1"));
    }
    pointer
}

/// What is wrong, without repeating the offending value (which may be personal data).
fn message_of(violation: &jsonschema::ValidationError<'_>) -> String {
    use jsonschema::error::ValidationErrorKind as Kind;
    match violation.kind() {
        Kind::Required { .. } => "is required".to_owned(),
        kind => format!(
            "fails `{}` (schema location `{}`)",
            kind.keyword(),
            violation.schema_path()
        ),
    }
}

/// Field errors from a payload that does not deserialize into a typed command or query.
pub(crate) fn decode_error(error: &serde_json::Error) -> Vec<FieldError> {
    // serde reports missing and unknown fields by name; point at them when it does.
    let message = error.to_string();
    let field = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|prefix| {
            let rest = message.split(prefix).nth(1)?;
            let name = rest.split('`').next()?;
            Some(format!("/{}", name.replace('~', "~0").replace('/', "~1")))
        })
        .unwrap_or_default();
    vec![FieldError::new(field, message)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn schema_reports_every_violation() {
        let schema = JsonSchemaValidator::new(&json!({
            "type": "object",
            "required": ["name"],
            "properties": {
                "age": { "type": "integer" },
                "tags": { "type": "array", "items": { "type": "string" } }
            }
        }))
        .unwrap();
        let errors = schema.validate(&json!({ "age": "x", "tags": ["a", 2, 3] }));
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["/age", "/name", "/tags/1", "/tags/2"]);
        assert!(errors.iter().all(|e| !e.message.contains("\"x\"")));
        assert!(schema.validate(&json!({ "name": "n" })).is_empty());
    }

    #[test]
    fn bad_schema_is_invalid_input() {
        let err = JsonSchemaValidator::new(&json!({ "type": 12 })).unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }));
    }

    #[test]
    fn decode_errors_point_at_the_field() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Create {
            name: String,
        }
        let err = serde_json::from_value::<Create>(json!({})).unwrap_err();
        assert_eq!(decode_error(&err)[0].field, "/name");
        let err = serde_json::from_value::<Create>(json!(3)).unwrap_err();
        assert_eq!(decode_error(&err)[0].field, "");
    }
}
