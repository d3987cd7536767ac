//! Saga definitions: a name and a validated flow.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::flow::{Branch, Flow, Node, WaitForEvent};
use crate::step::SagaStep;

/// A validated saga (or workflow): a name and the flow its instances run.
///
/// Build one from a list of steps with [`SagaDefinition::new`], or with the
/// [`builder`](SagaDefinition::builder) for parallel groups, branches and event waits.
/// Validation rejects an empty saga, empty names and names used twice (step, branch and
/// wait names identify nodes in the saga log, so they are unique within the saga).
///
/// ```
/// use orchestrator_core::HandlerError;
/// use orchestrator_saga::{Error, SagaDefinition, SagaStep};
/// use serde_json::{Value, json};
///
/// let step = |name: &str| SagaStep::new(name, |_: Value| async { Ok::<_, HandlerError>(json!({})) });
/// let saga = SagaDefinition::new("order", vec![step("validate"), step("payment")])?;
/// assert_eq!(saga.step_names(), ["validate", "payment"]);
///
/// let twice = SagaDefinition::new("order", vec![step("a"), step("a")]);
/// assert!(matches!(twice, Err(Error::DuplicateStep { .. })));
/// assert!(matches!(SagaDefinition::new("order", vec![]), Err(Error::EmptySaga { .. })));
/// # Ok::<(), Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct SagaDefinition {
    name: Arc<str>,
    pub(crate) flow: Flow,
    /// Every step by name, for compensation and for checking logs against the definition.
    pub(crate) steps: HashMap<Arc<str>, Arc<SagaStep>>,
    /// Every node name (steps, branches, waits) with what it is.
    pub(crate) names: HashMap<Arc<str>, NodeKind>,
}

/// What a named node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeKind {
    Step,
    Branch { arms: usize },
    Wait,
}

impl SagaDefinition {
    /// A saga running `steps` in order.
    pub fn new(name: impl Into<String>, steps: impl IntoIterator<Item = SagaStep>) -> Result<Self> {
        Self::from_flow(name, steps.into_iter().collect())
    }

    /// A saga running `flow`.
    pub fn from_flow(name: impl Into<String>, flow: Flow) -> Result<Self> {
        let name: String = name.into();
        if name.trim().is_empty() || name.chars().any(char::is_control) {
            return Err(Error::InvalidDefinition {
                saga: name,
                reason: "the saga's name must not be empty or contain control characters".into(),
            });
        }
        let mut definition = Self {
            name: Arc::from(name),
            flow: Flow::new(),
            steps: HashMap::new(),
            names: HashMap::new(),
        };
        if flow.is_empty() {
            return Err(Error::EmptySaga {
                saga: definition.name.to_string(),
            });
        }
        definition.index(&flow)?;
        definition.flow = flow;
        Ok(definition)
    }

    /// A builder for sagas with parallel groups, branches and event waits.
    pub fn builder(name: impl Into<String>) -> SagaBuilder {
        SagaBuilder {
            name: name.into(),
            flow: Flow::new(),
        }
    }

    /// The saga's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn shared_name(&self) -> &Arc<str> {
        &self.name
    }

    /// The names of every step, in definition order (parallel members and branch arms
    /// included, waits excluded).
    pub fn step_names(&self) -> Vec<&str> {
        let mut names = Vec::new();
        collect_steps(&self.flow, &mut names);
        names
    }

    /// The step named `name`.
    pub fn step(&self, name: &str) -> Option<&SagaStep> {
        self.steps.get(name).map(|s| &**s)
    }

    fn index(&mut self, flow: &Flow) -> Result<()> {
        for node in &flow.nodes {
            match node {
                Node::Step(step) => {
                    self.claim(&step.name, NodeKind::Step)?;
                    self.steps.insert(step.name.clone(), step.clone());
                }
                Node::Parallel(branches) => {
                    if branches.is_empty() || branches.iter().any(Flow::is_empty) {
                        return Err(self.invalid("a parallel group needs at least one branch, and every branch at least one step"));
                    }
                    branches.iter().try_for_each(|b| self.index(b))?;
                }
                Node::Branch(branch) => self.index_branch(branch)?,
                Node::Wait(wait) => self.index_wait(wait)?,
            }
        }
        Ok(())
    }

    fn index_branch(&mut self, branch: &Branch) -> Result<()> {
        if branch.arms.is_empty() && branch.otherwise.is_none() {
            return Err(self.invalid(format!(
                "branch `{}` has no arm; add one with `when` or `otherwise`",
                branch.name
            )));
        }
        let arms = branch.arms.len() + usize::from(branch.otherwise.is_some());
        self.claim(&branch.name, NodeKind::Branch { arms })?;
        for flow in branch.arms.iter().map(|a| &a.flow).chain(&branch.otherwise) {
            self.index(flow)?;
        }
        Ok(())
    }

    fn index_wait(&mut self, wait: &WaitForEvent) -> Result<()> {
        orchestrator_core::envelope::validate_event_type(&wait.event_type)
            .map_err(|e| self.invalid(format!("wait `{}`: {e}", wait.name)))?;
        self.claim(&wait.name, NodeKind::Wait)
    }

    fn claim(&mut self, name: &Arc<str>, kind: NodeKind) -> Result<()> {
        if name.trim().is_empty() || name.chars().any(char::is_control) {
            return Err(self.invalid(
                "step, branch and wait names must not be empty or contain control characters",
            ));
        }
        if self.names.insert(name.clone(), kind).is_some() {
            return Err(Error::DuplicateStep {
                saga: self.name.to_string(),
                step: name.to_string(),
            });
        }
        Ok(())
    }

    fn invalid(&self, reason: impl Into<String>) -> Error {
        Error::InvalidDefinition {
            saga: self.name.to_string(),
            reason: reason.into(),
        }
    }
}

fn collect_steps<'a>(flow: &'a Flow, names: &mut Vec<&'a str>) {
    for node in &flow.nodes {
        match node {
            Node::Step(step) => names.push(&step.name),
            Node::Parallel(branches) => branches.iter().for_each(|b| collect_steps(b, names)),
            Node::Branch(branch) => {
                for flow in branch.arms.iter().map(|a| &a.flow).chain(&branch.otherwise) {
                    collect_steps(flow, names);
                }
            }
            Node::Wait(_) => {}
        }
    }
}

/// Builds a [`SagaDefinition`] node by node; [`build`](Self::build) validates it.
///
/// ```
/// use std::time::Duration;
/// use orchestrator_core::HandlerError;
/// use orchestrator_saga::{Branch, SagaDefinition, SagaStep, WaitForEvent};
/// use serde_json::{Value, json};
///
/// let step = |name: &str| SagaStep::new(name, |_: Value| async { Ok::<_, HandlerError>(json!({})) });
/// let workflow = SagaDefinition::builder("fulfilment")
///     .step(step("reserve"))
///     .parallel([step("pack"), step("invoice")])
///     .branch(Branch::new("carrier").when("heavy", |c| c["kg"].as_f64() > Some(30.0), step("freight")).otherwise(step("parcel")))
///     .wait_for_event(WaitForEvent::new("delivered", "shipment.delivered").with_timeout(Duration::from_secs(86_400)))
///     .build()?;
/// assert_eq!(workflow.step_names(), ["reserve", "pack", "invoice", "freight", "parcel"]);
/// # Ok::<(), orchestrator_saga::Error>(())
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct SagaBuilder {
    name: String,
    flow: Flow,
}

impl SagaBuilder {
    /// Appends a step.
    pub fn step(mut self, step: SagaStep) -> Self {
        self.flow = self.flow.step(step);
        self
    }

    /// Appends a parallel group; see [`Flow::parallel`].
    pub fn parallel<I>(mut self, branches: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<Flow>,
    {
        self.flow = self.flow.parallel(branches);
        self
    }

    /// Appends a conditional branch; see [`Branch`].
    pub fn branch(mut self, branch: Branch) -> Self {
        self.flow = self.flow.branch(branch);
        self
    }

    /// Appends a wait for an event; see [`WaitForEvent`].
    pub fn wait_for_event(mut self, wait: WaitForEvent) -> Self {
        self.flow = self.flow.wait_for_event(wait);
        self
    }

    /// Appends every node of `flow`.
    pub fn then(mut self, flow: Flow) -> Self {
        self.flow = self.flow.then(flow);
        self
    }

    /// Validates the definition.
    pub fn build(self) -> Result<SagaDefinition> {
        SagaDefinition::from_flow(self.name, self.flow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orchestrator_core::HandlerError;
    use serde_json::{Value, json};

    fn step(name: &str) -> SagaStep {
        SagaStep::new(name, |_: Value| async { Ok::<_, HandlerError>(json!({})) })
    }

    #[test]
    fn names_must_be_unique_across_nested_flows() {
        let err = SagaDefinition::builder("s")
            .step(step("a"))
            .parallel([Flow::from(step("b")), Flow::new().step(step("a"))])
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::DuplicateStep { ref step, .. } if step == "a"));
        let err = SagaDefinition::builder("s")
            .step(step("x"))
            .branch(Branch::new("x").otherwise(step("y")))
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::DuplicateStep { .. }));
        let err = SagaDefinition::builder("s")
            .branch(Branch::new("b").when("t", |_| true, step("w")))
            .wait_for_event(WaitForEvent::new("w", "a.b"))
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::DuplicateStep { .. }));
    }

    #[test]
    fn malformed_definitions_are_rejected() {
        let invalid = |r: Result<SagaDefinition>| matches!(r, Err(Error::InvalidDefinition { .. }));
        assert!(invalid(SagaDefinition::new("", vec![step("a")])));
        assert!(invalid(SagaDefinition::new("s", vec![step("")])));
        assert!(invalid(
            SagaDefinition::builder("s")
                .parallel(Vec::<Flow>::new())
                .build()
        ));
        assert!(invalid(
            SagaDefinition::builder("s").parallel([Flow::new()]).build()
        ));
        assert!(invalid(
            SagaDefinition::builder("s")
                .branch(Branch::new("b"))
                .build()
        ));
        assert!(invalid(
            SagaDefinition::builder("s")
                .wait_for_event(WaitForEvent::new("w", "bad type"))
                .build()
        ));
        assert!(matches!(
            SagaDefinition::builder("s").build(),
            Err(Error::EmptySaga { .. })
        ));
    }

    #[test]
    fn steps_are_indexed() {
        let saga = SagaDefinition::builder("s")
            .step(step("a"))
            .branch(
                Branch::new("b")
                    .when("t", |_| true, step("c"))
                    .otherwise(step("d")),
            )
            .then(Flow::from(WaitForEvent::new("w", "x.y")))
            .build()
            .unwrap();
        assert_eq!(saga.step_names(), ["a", "c", "d"]);
        assert!(saga.step("c").is_some() && saga.step("w").is_none());
        assert_eq!(saga.names.get("b"), Some(&NodeKind::Branch { arms: 2 }));
        assert_eq!(saga.name(), "s");
    }
}
