//! Bad input gives typed errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::*;
use orchestrator_saga::{Error, SagaDefinition, SagaOrchestrator};
use orchestrator_store::InMemoryEventStore;
use serde_json::json;

#[tokio::test]
async fn bad_definitions_and_inputs_are_typed_errors() {
    let calls = Calls::default();
    let duplicate = SagaDefinition::new(
        "order",
        vec![ok_step(&calls, "pay"), ok_step(&calls, "pay")],
    );
    assert!(matches!(
        duplicate,
        Err(Error::DuplicateStep { ref saga, ref step }) if saga == "order" && step == "pay"
    ));
    let empty = SagaDefinition::new("order", vec![]);
    assert!(matches!(empty, Err(Error::EmptySaga { ref saga }) if saga == "order"));
    assert_eq!(
        empty.unwrap_err().to_string(),
        "saga `order` has no steps; give it at least one step"
    );

    let orch = SagaOrchestrator::new(Arc::new(InMemoryEventStore::new()));
    orch.define(SagaDefinition::new("order", vec![ok_step(&calls, "pay")]).unwrap())
        .unwrap();
    assert!(matches!(
        orch.define(SagaDefinition::new("order", vec![ok_step(&calls, "x")]).unwrap()),
        Err(Error::AlreadyDefined { .. })
    ));
    assert_eq!(orch.defined(), ["order"]);

    let undefined = orch.start("refund", json!({})).await.unwrap_err();
    assert!(matches!(undefined, Error::UndefinedSaga { ref saga } if saga == "refund"));
    assert!(undefined.to_string().contains("not defined"));

    for input in [json!([1]), json!("x"), json!(3)] {
        assert!(matches!(
            orch.start("order", input).await,
            Err(Error::InvalidInput { .. })
        ));
    }
    assert!(matches!(
        orch.start("order", json!({"_saga": 1})).await,
        Err(Error::InvalidInput { .. })
    ));
    assert!(
        orch.run("order", serde_json::Value::Null)
            .await
            .unwrap()
            .is_completed()
    );
    assert!(calls.count("do:x") == 0);

    orch.shutdown();
    assert!(matches!(
        orch.start("order", json!({})).await,
        Err(Error::Shutdown)
    ));
    assert!(matches!(orch.recover().await, Err(Error::Shutdown)));
    assert!(!format!("{orch:?}").is_empty());
}

/// Sagas log each transition at the version their runner last wrote; a store that cannot
/// check versions is refused when a saga is defined, before anything runs.
#[tokio::test]
async fn a_store_without_exact_versions_is_refused_when_defining() {
    use orchestrator_core::testkit::store::Limited;
    let store = Arc::new(Limited::without_exact_versions(InMemoryEventStore::new()));
    let orchestrator = SagaOrchestrator::new(store);
    let definition = SagaDefinition::new("trip", vec![ok_step(&Calls::default(), "a")]).unwrap();
    let refused = orchestrator.define(definition).unwrap_err();
    let message = refused.to_string();
    assert!(message.contains("in-memory, file or Redis"), "{message}");
    assert!(matches!(
        refused,
        Error::Core(orchestrator_core::Error::Unsupported { .. })
    ));
    assert!(
        orchestrator.list_stored().await.unwrap().is_empty(),
        "inspection still works"
    );
}
