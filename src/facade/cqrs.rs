//! Commands and queries through the facade.

use orchestrator_core::JsonHandler;
use std::sync::Arc;

use orchestrator_cqrs::{
    CommandBus, CommandOutcome, CommandRequest, QueryBus, QueryOptions, QueryRequest,
    ReadModelDefinition, ReadModelHandle,
};
use serde_json::Value;

use super::EventOrchestrator;
use crate::error::Result;

impl EventOrchestrator {
    /// Registers the handler of the command `name`: an async fn or closure taking the
    /// command's JSON payload and returning `Result<Value, E>` for any error type `E`.
    /// A name registered twice is an error.
    pub fn register_command_handler(&self, name: &str, handler: impl JsonHandler) -> Result<()> {
        Ok(self.commands.register(name, handler)?)
    }

    /// Sends the command `name` with `payload` and returns its handler's result. An unknown
    /// name is [`Error::UnknownCommand`](crate::Error::UnknownCommand); a failing handler is
    /// [`Error::Cqrs`](crate::Error::Cqrs).
    pub async fn send_command(&self, name: &str, payload: Value) -> Result<Value> {
        Ok(self.commands.send(name, payload).await?.value)
    }

    /// Sends a command with its id, correlation id, principal and headers, and returns its
    /// whole outcome: the value and the global position its events were written up to (the
    /// events it publishes through this orchestrator count), to pass to
    /// [`QueryRequest::at_least`] for read-your-writes.
    pub async fn send_command_with(&self, request: CommandRequest) -> Result<CommandOutcome> {
        Ok(self.commands.dispatch(request).await?)
    }

    /// Registers the handler of the query `name`, its results cached (see
    /// [`register_query_handler_with`](Self::register_query_handler_with) to change that).
    pub fn register_query_handler(&self, name: &str, handler: impl JsonHandler) -> Result<()> {
        Ok(self.queries.register(name, handler)?)
    }

    /// Registers the handler of the query `name` with `options`: no cache, what invalidates
    /// cached results, the read models it reads, a validator.
    pub fn register_query_handler_with(
        &self,
        name: &str,
        options: QueryOptions,
        handler: impl JsonHandler,
    ) -> Result<()> {
        Ok(self.queries.register_with(name, options, handler)?)
    }

    /// Executes the query `name` with `params` and returns its result (from the cache while
    /// it is fresh). An unknown name is [`Error::UnknownQuery`](crate::Error::UnknownQuery).
    pub async fn execute_query(&self, name: &str, params: Value) -> Result<Value> {
        Ok(self.queries.execute(name, params).await?)
    }

    /// Executes a query with its options: wait until the read models have seen a position
    /// (read-your-writes), bypass the cache.
    pub async fn execute_query_with(&self, request: QueryRequest) -> Result<Value> {
        Ok(self.queries.execute_request(request).await?)
    }

    /// Attaches a read model fed by this orchestrator's store: its projection applies every
    /// stored event (catch-up, then live), invalidates the cached query results that depend
    /// on it, and lets queries wait for a position (read-your-writes).
    pub async fn attach_read_model(
        &self,
        definition: ReadModelDefinition,
    ) -> Result<ReadModelHandle> {
        Ok(self
            .queries
            .attach_read_model(Arc::clone(&self.store), definition)
            .await?)
    }

    /// The command bus: typed commands, validators, middleware, aggregates.
    pub fn commands(&self) -> &CommandBus {
        &self.commands
    }

    /// The query bus: typed queries, the cache, read models, read-your-writes.
    pub fn queries(&self) -> &QueryBus {
        &self.queries
    }
}
