//! The causation tree of a trace.

use std::collections::HashMap;

use orchestrator::core::EventEnvelope;

use super::types::{Event, TraceNode, millis};

/// `events` (in global order) as a depth-first causation tree: each event followed by the
/// events it caused. An event whose cause is not among them is a root.
pub(crate) fn causation_tree(events: Vec<EventEnvelope>) -> Vec<TraceNode> {
    let Some(start) = events.iter().min_by_key(|e| e.time()).cloned() else {
        return Vec::new();
    };
    // The parent of each event (its index), when its cause is one of `events`.
    let parents: Vec<Option<usize>> = {
        let index: HashMap<&str, usize> = events
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id().as_str(), i))
            .collect();
        events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                e.causation_id()
                    .and_then(|c| index.get(c).copied())
                    .filter(|&p| p != i)
            })
            .collect()
    };
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); events.len()];
    for (i, parent) in parents.iter().enumerate() {
        if let Some(p) = parent {
            children[*p].push(i);
        }
    }
    let mut order: Vec<(usize, u32)> = Vec::with_capacity(events.len());
    let mut placed = vec![false; events.len()];
    let mut stack: Vec<(usize, u32)> = (0..events.len())
        .rev()
        .filter(|&i| parents[i].is_none())
        .map(|i| (i, 0))
        .collect();
    // A causation cycle (ids reused by hand-made events) has no root: its events are
    // placed as roots once the trees of the real roots are done.
    let mut next_unplaced = 0;
    loop {
        while let Some((i, depth)) = stack.pop() {
            if std::mem::replace(&mut placed[i], true) {
                continue;
            }
            order.push((i, depth));
            stack.extend(children[i].iter().rev().map(|&k| (k, depth + 1)));
        }
        while next_unplaced < events.len() && placed[next_unplaced] {
            next_unplaced += 1;
        }
        if next_unplaced == events.len() {
            break;
        }
        stack.push((next_unplaced, 0));
    }
    let parent_ids: Vec<Option<String>> = parents
        .iter()
        .map(|p| p.map(|p| events[p].id().as_str().to_owned()))
        .collect();
    let mut events: Vec<Option<EventEnvelope>> = events.into_iter().map(Some).collect();
    order
        .into_iter()
        .filter_map(|(i, depth)| {
            let event = events[i].take()?;
            Some(TraceNode {
                offset_ms: millis(&start, &event),
                event: Event(event),
                parent_id: if depth == 0 {
                    None
                } else {
                    parent_ids[i].clone()
                },
                depth,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> EventEnvelope {
        EventEnvelope::new("t.e", &serde_json::json!({}))
            .unwrap()
            .with_id(orchestrator::core::EventId::parse(id).unwrap())
    }

    fn shape(nodes: &[TraceNode]) -> Vec<(String, u32, Option<String>)> {
        nodes
            .iter()
            .map(|n| {
                (
                    n.event.0.id().as_str().to_owned(),
                    n.depth,
                    n.parent_id.clone(),
                )
            })
            .collect()
    }

    #[test]
    fn each_event_follows_its_cause_depth_first() {
        let nodes = causation_tree(vec![
            event("a"),
            event("b"),
            event("a1").with_causation_id("a"),
            event("a1x").with_causation_id("a1"),
            event("a2").with_causation_id("a"),
            event("orphan").with_causation_id("not-in-the-trace"),
        ]);
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(
            shape(&nodes),
            vec![
                ("a".to_owned(), 0, None),
                ("a1".to_owned(), 1, some("a")),
                ("a1x".to_owned(), 2, some("a1")),
                ("a2".to_owned(), 1, some("a")),
                ("b".to_owned(), 0, None),
                ("orphan".to_owned(), 0, None),
            ]
        );
    }

    #[test]
    fn a_causation_cycle_is_placed_once_and_ends() {
        let nodes = causation_tree(vec![
            event("x").with_causation_id("y"),
            event("y").with_causation_id("x"),
            event("self").with_causation_id("self"),
        ]);
        let ids: Vec<String> = shape(&nodes).into_iter().map(|(id, _, _)| id).collect();
        assert_eq!(ids, ["self", "x", "y"]);
        assert!(causation_tree(Vec::new()).is_empty());
    }
}
