//! Redis Streams backend (in progress).
