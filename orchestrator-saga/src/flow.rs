//! Flows: sequences of steps, parallel groups, branches and event waits.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::step::SagaStep;

/// A sequence of nodes run one after the other: the body of a saga, of a parallel branch
/// and of a branch arm.
///
/// ```
/// use orchestrator_core::HandlerError;
/// use orchestrator_saga::{Flow, SagaStep};
/// use serde_json::{Value, json};
///
/// let step = |name: &str| SagaStep::new(name, |_: Value| async { Ok::<_, HandlerError>(json!({})) });
/// let flow = Flow::new()
///     .step(step("reserve"))
///     .parallel([step("email"), step("sms")]);
/// assert_eq!(flow.len(), 2);
/// ```
#[derive(Clone, Default, Debug)]
pub struct Flow {
    pub(crate) nodes: Vec<Node>,
}

/// One node of a flow.
#[derive(Clone, Debug)]
pub(crate) enum Node {
    Step(Arc<SagaStep>),
    Parallel(Vec<Flow>),
    Branch(Arc<Branch>),
    Wait(Arc<WaitForEvent>),
}

impl Flow {
    /// An empty flow.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a step.
    pub fn step(mut self, step: SagaStep) -> Self {
        self.nodes.push(Node::Step(Arc::new(step)));
        self
    }

    /// Appends a group of branches that run at the same time and join: the flow goes on
    /// when every branch has finished. A branch is a [`Flow`], or a single [`SagaStep`] or
    /// [`WaitForEvent`].
    ///
    /// When a member fails, the branches stop starting new steps, steps already running
    /// finish (and are compensated if they complete), and waits are cancelled.
    pub fn parallel<I>(mut self, branches: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<Flow>,
    {
        self.nodes.push(Node::Parallel(
            branches.into_iter().map(Into::into).collect(),
        ));
        self
    }

    /// Appends a conditional branch: the first arm whose predicate holds on the context runs.
    pub fn branch(mut self, branch: Branch) -> Self {
        self.nodes.push(Node::Branch(Arc::new(branch)));
        self
    }

    /// Appends a step that waits for an event.
    pub fn wait_for_event(mut self, wait: WaitForEvent) -> Self {
        self.nodes.push(Node::Wait(Arc::new(wait)));
        self
    }

    /// Appends every node of `other`.
    pub fn then(mut self, other: Flow) -> Self {
        self.nodes.extend(other.nodes);
        self
    }

    /// How many nodes the flow has (a parallel group or a branch counts as one).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the flow has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

impl From<SagaStep> for Flow {
    fn from(step: SagaStep) -> Self {
        Flow::new().step(step)
    }
}

impl From<WaitForEvent> for Flow {
    fn from(wait: WaitForEvent) -> Self {
        Flow::new().wait_for_event(wait)
    }
}

impl From<Branch> for Flow {
    fn from(branch: Branch) -> Self {
        Flow::new().branch(branch)
    }
}

impl FromIterator<SagaStep> for Flow {
    fn from_iter<I: IntoIterator<Item = SagaStep>>(steps: I) -> Self {
        steps.into_iter().fold(Flow::new(), Flow::step)
    }
}

/// A predicate on the saga's context.
pub(crate) type Predicate = Arc<dyn Fn(&Value) -> bool + Send + Sync>;

/// Conditional branching: arms tried in order, the first whose predicate holds on the
/// context runs, else the `otherwise` flow (or nothing).
///
/// The choice is recorded in the saga log, so a recovered saga takes the same arm even if
/// the predicate would now decide differently.
///
/// ```
/// use orchestrator_core::HandlerError;
/// use orchestrator_saga::{Branch, SagaStep};
/// use serde_json::{Value, json};
///
/// let step = |name: &str| SagaStep::new(name, |_: Value| async { Ok::<_, HandlerError>(json!({})) });
/// let route = Branch::new("route")
///     .when("large", |ctx| ctx["amount"].as_f64().unwrap_or(0.0) > 1000.0, step("manual_review"))
///     .otherwise(step("auto_approve"));
/// # let _ = route;
/// ```
#[derive(Clone)]
pub struct Branch {
    pub(crate) name: Arc<str>,
    pub(crate) arms: Vec<Arm>,
    pub(crate) otherwise: Option<Flow>,
}

#[derive(Clone)]
pub(crate) struct Arm {
    pub(crate) label: String,
    pub(crate) predicate: Predicate,
    pub(crate) flow: Flow,
}

impl Branch {
    /// A branch named `name` (unique within the saga, like step names), with no arm yet.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: Arc::from(name.into()),
            arms: Vec::new(),
            otherwise: None,
        }
    }

    /// Adds an arm: `flow` runs when `predicate` holds on the context (and no earlier arm's
    /// did). `label` names the arm in the log and in traces.
    pub fn when(
        mut self,
        label: impl Into<String>,
        predicate: impl Fn(&Value) -> bool + Send + Sync + 'static,
        flow: impl Into<Flow>,
    ) -> Self {
        self.arms.push(Arm {
            label: label.into(),
            predicate: Arc::new(predicate),
            flow: flow.into(),
        });
        self
    }

    /// The flow run when no arm's predicate holds.
    pub fn otherwise(mut self, flow: impl Into<Flow>) -> Self {
        self.otherwise = Some(flow.into());
        self
    }

    /// The branch's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The arm to run for `context`: its index (`arms.len()` for `otherwise`) and label, or
    /// `None` when nothing runs.
    pub(crate) fn choose(&self, context: &Value) -> Option<(usize, &str)> {
        match self.arms.iter().position(|arm| (arm.predicate)(context)) {
            Some(i) => Some((i, &self.arms[i].label)),
            None => self
                .otherwise
                .as_ref()
                .map(|_| (self.arms.len(), "otherwise")),
        }
    }

    /// The flow of arm `index` as [`choose`](Self::choose) numbers them.
    pub(crate) fn arm_flow(&self, index: usize) -> Option<&Flow> {
        match self.arms.get(index) {
            Some(arm) => Some(&arm.flow),
            None if index == self.arms.len() => self.otherwise.as_ref(),
            None => None,
        }
    }
}

impl fmt::Debug for Branch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Branch")
            .field("name", &self.name)
            .field(
                "arms",
                &self.arms.iter().map(|a| &a.label).collect::<Vec<_>>(),
            )
            .field("otherwise", &self.otherwise.is_some())
            .finish()
    }
}

/// Where a wait finds the correlation id the awaited event must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Correlation {
    /// The saga's id.
    SagaId,
    /// A context field: a top-level key, or a JSON pointer when it starts with `/`.
    Field(String),
}

/// A step that waits for an event of a type whose correlation id matches, with an optional
/// timeout.
///
/// The event reaches the saga through
/// [`SagaOrchestrator::deliver_event`](crate::SagaOrchestrator::deliver_event) or a
/// transport subscription started with [`SagaOrchestrator::listen`](crate::SagaOrchestrator::listen).
/// Its data is the step's output: an object is merged into the context, anything else is
/// stored under the step's name. When the timeout passes first, the step fails (and the
/// saga compensates). The deadline is recorded when the wait starts, so a recovered saga
/// keeps the original deadline.
///
/// ```
/// use std::time::Duration;
/// use orchestrator_saga::WaitForEvent;
///
/// let wait = WaitForEvent::new("await_payment", "payment.confirmed")
///     .correlate_on("order_id")
///     .with_timeout(Duration::from_secs(15 * 60));
/// assert_eq!(wait.event_type(), "payment.confirmed");
/// ```
#[derive(Debug, Clone)]
pub struct WaitForEvent {
    pub(crate) name: Arc<str>,
    pub(crate) event_type: String,
    pub(crate) correlation: Correlation,
    pub(crate) timeout: Option<Duration>,
}

impl WaitForEvent {
    /// Waits for an event of `event_type` whose correlation id is the saga's id.
    pub fn new(name: impl Into<String>, event_type: impl Into<String>) -> Self {
        Self {
            name: Arc::from(name.into()),
            event_type: event_type.into(),
            correlation: Correlation::SagaId,
            timeout: None,
        }
    }

    /// Matches on the context value at `field` instead (a top-level key, or a JSON pointer
    /// such as `/order/id`); strings match as they are, numbers and booleans as their JSON
    /// text.
    pub fn correlate_on(mut self, field: impl Into<String>) -> Self {
        self.correlation = Correlation::Field(field.into());
        self
    }

    /// Fails the wait when no event has come within `timeout` (on the orchestrator's
    /// clock). Without a timeout the wait lasts until the event comes.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The wait's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The awaited event type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The timeout, if any.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The correlation id to wait for, given the context and the saga's id.
    pub(crate) fn correlation_id(&self, context: &Value, saga_id: &str) -> Result<String, String> {
        let Correlation::Field(field) = &self.correlation else {
            return Ok(saga_id.to_owned());
        };
        let value = if field.starts_with('/') {
            context.pointer(field)
        } else {
            context.get(field)
        };
        match value {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(v.to_string()),
            Some(_) => Err(format!(
                "the context field `{field}` to correlate on is not a string, number or boolean"
            )),
            None => Err(format!(
                "the context has no field `{field}` to correlate on"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn step(name: &str) -> SagaStep {
        SagaStep::new(name, |v: Value| async move {
            Ok::<_, orchestrator_core::HandlerError>(v)
        })
    }

    #[test]
    fn branches_pick_the_first_matching_arm() {
        let branch = Branch::new("b")
            .when("big", |c| c["n"].as_i64() > Some(10), step("x"))
            .when("any", |_| true, step("y"));
        assert_eq!(branch.choose(&json!({"n": 11})), Some((0, "big")));
        assert_eq!(branch.choose(&json!({"n": 1})), Some((1, "any")));
        let strict = Branch::new("c").when("never", |_| false, step("z"));
        assert_eq!(strict.choose(&json!({})), None);
        let fallback = strict.otherwise(step("w"));
        assert_eq!(fallback.choose(&json!({})), Some((1, "otherwise")));
        assert!(fallback.arm_flow(1).is_some() && fallback.arm_flow(2).is_none());
    }

    #[test]
    fn correlation_ids_come_from_the_context() {
        let ctx = json!({"order_id": "o-1", "n": 7, "nested": {"id": "x"}, "list": []});
        let by = |f: &str| WaitForEvent::new("w", "a.b").correlate_on(f);
        assert_eq!(
            WaitForEvent::new("w", "a.b").correlation_id(&ctx, "id"),
            Ok("id".into())
        );
        assert_eq!(by("order_id").correlation_id(&ctx, "id"), Ok("o-1".into()));
        assert_eq!(by("n").correlation_id(&ctx, "id"), Ok("7".into()));
        assert_eq!(by("/nested/id").correlation_id(&ctx, "id"), Ok("x".into()));
        assert!(by("list").correlation_id(&ctx, "id").is_err());
        assert!(by("missing").correlation_id(&ctx, "id").is_err());
    }

    #[test]
    fn flows_are_built_from_steps() {
        let flow: Flow = [step("a"), step("b")].into_iter().collect();
        assert_eq!(flow.len(), 2);
        let joined = flow
            .then(Flow::from(step("c")))
            .parallel([step("d"), step("e")]);
        assert_eq!(joined.len(), 4);
        assert!(!joined.is_empty() && Flow::new().is_empty());
        assert!(format!("{:?}", Branch::new("b")).contains("\"b\""));
    }
}
