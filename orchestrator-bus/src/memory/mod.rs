//! In-process implementations of the core traits: [`InProcessTransport`] carries events
//! between tasks of one process, [`InMemoryDeadLetterQueue`] parks failed deliveries in
//! memory. Both are what the umbrella runs on when no broker is configured, and both pass
//! the core conformance suites.

mod dlq;
mod transport;

pub use dlq::{DEFAULT_DLQ_CAPACITY, InMemoryDeadLetterQueue};
pub use transport::{DEFAULT_CAPACITY, InProcessTransport, InProcessTransportBuilder};
