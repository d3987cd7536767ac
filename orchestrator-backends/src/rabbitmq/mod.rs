//! RabbitMQ backend (in progress).
