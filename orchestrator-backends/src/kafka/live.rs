//! Which consumers of this process are still open, per topic prefix: deleting topics that a
//! consumer still fetches from is what the tear-down waits out (see the module docs on tansu).

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

static LIVE: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());

/// Counts one open consumer under a prefix for as long as it lives.
pub(crate) struct LiveConsumer {
    prefix: String,
}

impl LiveConsumer {
    pub(crate) fn new(prefix: &str) -> Self {
        *LIVE
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(prefix.to_owned())
            .or_default() += 1;
        Self {
            prefix: prefix.to_owned(),
        }
    }
}

impl Drop for LiveConsumer {
    fn drop(&mut self) {
        let mut live = LIVE.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = live.get_mut(&self.prefix) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                live.remove(&self.prefix);
            }
        }
    }
}

/// How many consumers are open under prefixes that start with `prefix`.
fn open_under(prefix: &str) -> usize {
    LIVE.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter(|(p, _)| p.starts_with(prefix))
        .map(|(_, n)| n)
        .sum()
}

/// Waits until no consumer under `prefix` is open, for at most `timeout`; returns whether
/// they all closed.
pub(crate) async fn wait_closed(prefix: &str, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if open_under(prefix) == 0 {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
