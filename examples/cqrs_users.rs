//! CQRS with the facade: `create_user` and `rename_user` commands write events; a read
//! model built from the store keeps a document per user; the `get_user` query reads it,
//! with a cache that the user's own events invalidate.
//!
//! Run it with `cargo run --example cqrs_users`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use orchestrator::cqrs::{ReadModelDefinition, ReadModelStore};
use orchestrator::prelude::*;
use serde_json::{Value, json};

/// The read model: one document per user, under `user-<id>` (the user's stream).
async fn apply_user_event(
    event: EventEnvelope,
    users: Arc<dyn ReadModelStore>,
) -> Result<(), HandlerError> {
    let Some(stream) = event.stream_id().map(str::to_owned) else {
        return Ok(());
    };
    let data: Value = event.data()?;
    match event.event_type() {
        "user.created" => users.put(&stream, data).await?,
        "user.renamed" => {
            let mut user = users.get(&stream).await?.unwrap_or_default();
            user["name"] = data["name"].clone();
            users.put(&stream, user).await?;
        }
        _ => {}
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let orchestrator = EventOrchestrator::new();
    let users = orchestrator
        .attach_read_model(
            ReadModelDefinition::new("users", apply_user_event)
                .event_types(["user.created", "user.renamed"]),
        )
        .await?;

    // Commands: validate, then record what happened as events in the user's stream.
    let next_id = Arc::new(AtomicU64::new(123));
    let events = orchestrator.clone();
    orchestrator.register_command_handler("create_user", move |data: Value| {
        let (events, next_id) = (events.clone(), next_id.clone());
        async move {
            let Some(name) = data["name"].as_str() else {
                return Err(HandlerError::permanent("`name` is required"));
            };
            let user_id = format!("USER{}", next_id.fetch_add(1, Ordering::SeqCst));
            let created =
                EventEnvelope::new("user.created", &json!({"user_id": user_id, "name": name}))?
                    .with_stream_id(format!("user-{user_id}"));
            events.publish(created).await?;
            Ok(json!({ "user_id": user_id, "created": true }))
        }
    })?;
    let events = orchestrator.clone();
    orchestrator.register_command_handler("rename_user", move |data: Value| {
        let events = events.clone();
        async move {
            let user_id = data["user_id"].as_str().unwrap_or_default();
            let renamed = EventEnvelope::new("user.renamed", &json!({"name": data["name"]}))?
                .with_stream_id(format!("user-{user_id}"));
            events.publish(renamed).await?;
            Ok::<_, HandlerError>(json!({ "renamed": true }))
        }
    })?;

    // The query reads the read model; its cached results are invalidated only by events of
    // the user's own stream.
    let documents = users.storage().clone();
    orchestrator.register_query_handler_with(
        "get_user",
        QueryOptions::new()
            .reads("users")
            .keyed_by_stream(|params| params["user_id"].as_str().map(|id| format!("user-{id}"))),
        move |params: Value| {
            let documents = documents.clone();
            async move {
                let key = format!("user-{}", params["user_id"].as_str().unwrap_or_default());
                println!("    (query handler reads the read model: {key})");
                Ok::<_, HandlerError>(documents.get(&key).await?.unwrap_or(Value::Null))
            }
        },
    )?;

    // The outcome says where the command's events were written: the first query waits
    // until the read model has seen them (read your own writes).
    let created = orchestrator
        .send_command_with(CommandRequest::new(
            "create_user",
            json!({ "name": "John" }),
        ))
        .await?;
    println!("create_user -> {}", created.value);
    let user_id = created.value["user_id"].clone();

    println!("get_user (first time: runs the handler)");
    let user = orchestrator
        .execute_query_with(
            QueryRequest::new("get_user", json!({ "user_id": user_id })).at_least(created.position),
        )
        .await?;
    println!("  -> {user}");
    assert_eq!(user["name"], "John");
    println!("get_user (again: answered from the cache)");
    let cached = orchestrator
        .execute_query("get_user", json!({ "user_id": user_id }))
        .await?;
    println!("  -> {cached}");
    assert_eq!(user, cached);

    let renamed = orchestrator
        .send_command_with(CommandRequest::new(
            "rename_user",
            json!({ "user_id": user_id, "name": "Johnny" }),
        ))
        .await?;
    println!("rename_user, then get_user (the user's event invalidated the cached result)");
    let renamed = orchestrator
        .execute_query_with(
            QueryRequest::new("get_user", json!({ "user_id": user_id })).at_least(renamed.position),
        )
        .await?;
    println!("  -> {renamed}");
    assert_eq!(renamed["name"], "Johnny");

    match orchestrator.send_command("create_user", json!({})).await {
        Err(error) => println!("create_user without a name -> error: {error}"),
        Ok(value) => return Err(format!("expected a failure, got {value}").into()),
    }
    match orchestrator.send_command("delete_user", json!({})).await {
        Err(error) => println!("delete_user -> error: {error}"),
        Ok(value) => return Err(format!("expected a failure, got {value}").into()),
    }
    Ok(())
}
