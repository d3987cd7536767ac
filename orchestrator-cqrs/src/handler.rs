//! Handlers as the buses store them: JSON in, JSON out, validation first.

use std::any::{Any, TypeId};
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use orchestrator_core::{HandlerError, JsonHandler};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, HandlerKind, Result};
use crate::telemetry;
use crate::validation::{FieldError, Validator, decode_error};

/// A registered command or query handler.
#[async_trait]
pub(crate) trait DynHandler: Send + Sync + 'static {
    /// Validates `input` and runs the handler.
    async fn call(&self, name: &str, input: Value) -> Result<Value>;

    /// The type a typed handler takes, which [`call_typed`](Self::call_typed) accepts
    /// boxed; `None` for a JSON handler.
    fn input_type(&self) -> Option<TypeId> {
        None
    }

    /// Validates and runs the handler on an input of its [`input_type`](Self::input_type),
    /// without the JSON round trips of [`call`](Self::call): the output comes back boxed as
    /// the handler returned it. An input of another type is a caller's bug, reported as an
    /// error.
    async fn call_typed(
        &self,
        name: &str,
        input: Box<dyn Any + Send>,
    ) -> Result<Box<dyn Any + Send>> {
        drop(input);
        Err(Error::invalid(
            "command",
            format!("the handler of `{name}` takes JSON, not a typed value"),
        ))
    }
}

/// A dynamic handler, with an optional validator.
pub(crate) struct Dynamic {
    pub(crate) kind: HandlerKind,
    pub(crate) handler: Arc<dyn JsonHandler>,
    pub(crate) validator: Option<Arc<dyn Validator>>,
}

#[async_trait]
impl DynHandler for Dynamic {
    async fn call(&self, name: &str, input: Value) -> Result<Value> {
        if let Some(validator) = &self.validator {
            check(self.kind, name, validator.validate(&input))?;
        }
        self.handler
            .call(input)
            .await
            .map_err(|e| Error::from_handler(self.kind, name, e))
    }
}

/// A typed handler of `T`, which is decoded from the JSON input and validated by `validate`.
pub(crate) struct Typed<T, F> {
    kind: HandlerKind,
    handler: F,
    validate: fn(&T) -> Vec<FieldError>,
    _input: PhantomData<fn(T)>,
}

impl<T, F> Typed<T, F> {
    pub(crate) fn new(kind: HandlerKind, handler: F, validate: fn(&T) -> Vec<FieldError>) -> Self {
        Self {
            kind,
            handler,
            validate,
            _input: PhantomData,
        }
    }
}

#[async_trait]
impl<T, O, F, Fut, E> DynHandler for Typed<T, F>
where
    T: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<O, E>> + Send + 'static,
    E: Into<HandlerError> + 'static,
{
    fn input_type(&self) -> Option<TypeId> {
        Some(TypeId::of::<T>())
    }

    async fn call_typed(
        &self,
        name: &str,
        input: Box<dyn Any + Send>,
    ) -> Result<Box<dyn Any + Send>> {
        let Ok(input) = input.downcast::<T>() else {
            return Err(Error::invalid(
                format!("{} input", self.kind),
                format!("`{name}` was sent a value of another type than its handler takes"),
            ));
        };
        check(self.kind, name, (self.validate)(&input))?;
        let output = (self.handler)(*input)
            .await
            .map_err(|e| Error::from_handler(self.kind, name, e.into()))?;
        Ok(Box::new(output))
    }

    async fn call(&self, name: &str, input: Value) -> Result<Value> {
        let input: T = match serde_json::from_value(input) {
            Ok(input) => input,
            Err(e) => return Err(failed(self.kind, name, decode_error(&e))),
        };
        check(self.kind, name, (self.validate)(&input))?;
        let output = (self.handler)(input)
            .await
            .map_err(|e| Error::from_handler(self.kind, name, e.into()))?;
        serde_json::to_value(output).map_err(|e| {
            Error::invalid(
                format!("{} result", self.kind),
                format!("`{name}` result does not serialize: {e}"),
            )
        })
    }
}

/// `Ok` if there are no field errors; the validation error, counted, otherwise.
pub(crate) fn check(kind: HandlerKind, name: &str, errors: Vec<FieldError>) -> Result<()> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(failed(kind, name, errors))
    }
}

fn failed(kind: HandlerKind, name: &str, errors: Vec<FieldError>) -> Error {
    let kind_label = match kind {
        HandlerKind::Command => "command",
        HandlerKind::Query => "query",
    };
    metrics::counter!(telemetry::VALIDATION_FAILURES, "kind" => kind_label, "name" => name.to_owned())
        .increment(1);
    Error::Validation {
        kind,
        name: name.to_owned(),
        errors,
    }
}
