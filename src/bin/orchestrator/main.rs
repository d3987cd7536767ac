//! The orchestrator CLI (being written).
fn main() {}
