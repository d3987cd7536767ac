"use strict";
// Every GraphQL operation the dashboard sends, and nothing else: app.js takes them from
// here. Each is a plain template literal (no `${…}`) after a marker comment naming it
// (`/* op:NAME */`, written without the spaces). orchestrator-server's tests/dashboard.rs
// extracts them by those markers and runs each against the real schema on a live
// orchestrator, so a schema change that breaks the page fails the build.
window.DASHBOARD_QUERIES = Object.freeze({
  overview: /*op:overview*/ `query Overview {
  system { store durable transport headPosition deadLetters readOnly maxPageSize }
  relay { state relayedPosition checkpoint headPosition lag deadLettered leased }
  projections { name checkpoint lag checkpointedAt }
}`,

  eventAt: /*op:eventAt*/ `query EventAt($position: Int!) {
  eventAt(position: $position) {
    id type schemaVersion source time subject correlationId causationId traceparent
    streamId streamVersion globalPosition contentType cloudEvent
  }
}`,

  eventById: /*op:eventById*/ `query EventById($id: String!) {
  event(id: $id) {
    id type schemaVersion source time subject correlationId causationId traceparent
    streamId streamVersion globalPosition contentType cloudEvent
  }
}`,

  trace: /*op:trace*/ `query Trace($correlationId: String!) {
  trace(correlationId: $correlationId) {
    correlationId
    sagaIds
    nodes {
      parentId depth offsetMs
      event { id type time source streamId streamVersion globalPosition }
    }
  }
}`,

  sagas: /*op:sagas*/ `query Sagas($unfinished: Boolean) {
  sagas(unfinished: $unfinished) { id saga status statusName startedAt }
}`,

  saga: /*op:saga*/ `query Saga($id: String!) {
  saga(id: $id) {
    id saga status statusName startedAt updatedAt
    completedSteps runningSteps compensatedSteps
    failure { step attempts error timedOut }
    compensationFailures { step attempts error timedOut }
    context
    log { type step time offsetMs sincePreviousMs }
  }
}`,

  deadLetters: /*op:deadLetters*/ `query DeadLetters($first: Int) {
  deadLetters(first: $first) {
    id topic subscription reason attempts firstFailureAt lastFailureAt
    event { id type time correlationId globalPosition }
  }
}`,

  deadLetter: /*op:deadLetter*/ `query DeadLetter($id: String!) {
  deadLetter(id: $id) {
    id topic subscription reason attempts firstFailureAt lastFailureAt
    event { id type time correlationId globalPosition cloudEvent }
  }
}`,

  reprocessDeadLetter: /*op:reprocessDeadLetter*/ `mutation Reprocess($id: String!) {
  reprocessDeadLetter(id: $id) { id }
}`,

  discardDeadLetter: /*op:discardDeadLetter*/ `mutation Discard($id: String!) {
  discardDeadLetter(id: $id) { id }
}`,

  liveEvents: /*op:liveEvents*/ `subscription LiveEvents($types: [String!], $fromPosition: Int) {
  events(types: $types, fromPosition: $fromPosition) {
    id type time source subject correlationId streamId streamVersion globalPosition
  }
}`,

  sagaUpdates: /*op:sagaUpdates*/ `subscription SagaUpdates($fromPosition: Int) {
  sagaUpdates(fromPosition: $fromPosition) { sagaId type saga step status time globalPosition }
}`,

  deadLetterArrivals: /*op:deadLetterArrivals*/ `subscription DeadLetterArrivals($since: DateTime) {
  deadLetterArrivals(since: $since) {
    id topic subscription reason attempts lastFailureAt
    event { id type correlationId globalPosition }
  }
}`,
});
