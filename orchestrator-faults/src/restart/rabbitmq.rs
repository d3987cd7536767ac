//! RabbitMQ: the shared broker's app restarted with `rabbitmqctl stop_app` / `start_app`
//! (the Erlang node stays up) mid-run. A guard runs `start_app` however the scenario ends.
//!
//! Duplicates come from two places, both counted: messages whose ack was lost with the
//! connection come back flagged as redeliveries (attempt > 1), and messages whose publisher
//! confirm was lost with the connection are published again — by the transport, which
//! re-sends the unconfirmed rest of a batch on a new connection, or by the caller — so the
//! copies that did land are delivered as new messages. Those copies are checked to belong
//! to publishes that were under way during the outage.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use orchestrator_backends::rabbitmq::{RabbitMqConfig, RabbitMqTransport};

use super::{Plan, check_nothing_lost, drive, report};
use crate::{Failure, Res, ensure};

/// `rabbitmqctl <args>`.
fn rabbitmqctl(args: &[&str]) -> Res {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into())
    }
}

/// Stops the broker's app; whatever happens next, its `Drop` starts it again.
struct AppStopped;

impl AppStopped {
    fn stop() -> Res<Self> {
        let guard = AppStopped;
        rabbitmqctl(&["stop_app"])?;
        Ok(guard)
    }

    fn start(self) -> Res {
        rabbitmqctl(&["start_app"])?;
        rabbitmqctl(&["await_startup", "--timeout", "120"])?;
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for AppStopped {
    fn drop(&mut self) {
        // Leave the shared broker running, whatever happened.
        for _ in 0..3 {
            if rabbitmqctl(&["start_app"]).is_ok()
                && rabbitmqctl(&["await_startup", "--timeout", "120"]).is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        eprintln!("could not start RabbitMQ again: run `rabbitmqctl start_app`");
    }
}

pub(crate) async fn run(events: usize) -> Result<(), Failure> {
    let url = std::env::var("ORCHESTRATOR_AMQP_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let prefix = format!("faults.restart.{}", uuid::Uuid::now_v7().simple());
    let config = RabbitMqConfig::new(&url)
        .with_exchange(format!("{prefix}.events"))
        .with_queue_prefix(&prefix)
        .with_queue_expiry(Duration::from_secs(600))
        .with_connect_timeout(Duration::from_secs(60))
        .with_publish_timeout(Duration::from_secs(90))
        .with_reconnect_backoff(Duration::from_millis(100), Duration::from_secs(1));
    let transport = RabbitMqTransport::connect(config)
        .await
        .map_err(|e| Failure::CannotRun(format!("RabbitMQ at {url} is unreachable: {e}")))?;
    rabbitmqctl(&["status"])
        .map_err(|e| Failure::CannotRun(format!("cannot control the local RabbitMQ: {e}")))?;
    let result = scenario(&transport, events).await;
    // Whatever happened, the queues and exchanges of this run go.
    if let Err(e) = transport.delete_topology().await {
        eprintln!("  cleanup failed: {e}");
    }
    transport.close().await;
    Ok(result?)
}

async fn scenario(transport: &RabbitMqTransport, events: usize) -> Res {
    eprintln!("restart/rabbitmq: {events} events, stop_app/start_app of the local broker");
    let plan = Plan {
        events,
        publishers: 2,
        batch: 100,
        prefetch: 500,
        deadline: Duration::from_secs(240 + events as u64 / 200),
    };
    let restart = async {
        let downtime = tokio::task::spawn_blocking(|| {
            let started = std::time::Instant::now();
            let stopped = AppStopped::stop()?;
            std::thread::sleep(Duration::from_secs(2));
            stopped.start()?;
            Ok::<_, crate::BoxError>(started.elapsed())
        })
        .await??;
        Ok(downtime)
    };
    let tally = drive(
        Arc::new(transport.clone()),
        "work.item",
        "workers",
        &plan,
        || restart,
    )
    .await?;

    let mut line = report("rabbitmq", events, &tally);
    check_nothing_lost(events, &tally)?;
    // A copy (an event delivered twice as new) comes from a publish whose confirm was lost
    // with the connection and that was sent again — by the caller, or by the transport,
    // which re-sends the unconfirmed rest of a batch on a new connection (at-least-once).
    // Only events whose publish was under way during the outage can have one.
    let unexplained = tally.unexplained_copies();
    ensure(unexplained.is_empty(), || {
        format!(
            "{} events delivered twice as new although their publish was not under way \
             during the outage, e.g. {:?}",
            unexplained.len(),
            &unexplained[..unexplained.len().min(10)]
        )
    })?;
    line.add("republished_events", tally.republished);
    line.print();
    Ok(())
}
