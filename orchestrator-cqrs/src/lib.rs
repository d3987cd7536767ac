//! # orchestrator-cqrs
