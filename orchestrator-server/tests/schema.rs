//! The checked-in `schema.graphql` is the schema the code serves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

#[test]
fn the_checked_in_schema_matches_the_code() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema.graphql");
    let sdl = orchestrator_server::schema_sdl();
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &sdl).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == sdl,
        "{} is not the schema the code serves; regenerate it with \
         `UPDATE_SCHEMA=1 cargo test -p orchestrator-server --test schema` and commit it",
        path.display()
    );
}
