//! Redis: a spare redis-server (append-only file, fsync always) restarted with `SHUTDOWN`
//! mid-run. A first delivery lost with the connection (read by Redis, reply never
//! received) comes back as attempt 2 when reclaimed: a counted redelivery. What must never
//! happen is an event delivered twice as a first attempt.

use std::sync::Arc;
use std::time::Duration;

use orchestrator_backends::redis::{RedisConfig, RedisTransport};

use super::{Plan, check_nothing_lost, drive, report};
use crate::spare::SpareRedis;
use crate::{Failure, Res, ensure};

pub(crate) async fn run(events: usize) -> Result<(), Failure> {
    let server = SpareRedis::start()
        .map_err(|e| Failure::CannotRun(format!("cannot start a spare redis-server: {e}")))?;
    Ok(scenario(server, events).await?)
}

async fn scenario(server: SpareRedis, events: usize) -> Res {
    eprintln!(
        "restart/redis: {events} events, spare redis-server at {}",
        server.url()
    );
    let config = RedisConfig::new(&server.url())?
        .with_prefix("faults:")
        .with_claim_min_idle(Duration::from_secs(2))
        .with_retry_for(Duration::from_secs(60));
    let transport = RedisTransport::connect(config).await?;
    let plan = Plan {
        events,
        publishers: 4,
        batch: 20,
        prefetch: 100,
        deadline: Duration::from_secs(60 + events as u64 / 200),
    };
    let mut server = Some(server);
    let restart = async {
        let mut spare = server.take().ok_or("the server is gone")?;
        let (spare, downtime) = tokio::task::spawn_blocking(move || {
            let downtime = spare.restart();
            (spare, downtime)
        })
        .await?;
        server = Some(spare);
        downtime
    };
    let tally = drive(
        Arc::new(transport.clone()),
        "load.generated",
        "loader",
        &plan,
        || restart,
    )
    .await?;
    transport.close().await;
    // The topic stream's length tells copies written by a publish retried after the
    // restart from events delivered twice by the consumer side.
    let entries = server
        .as_ref()
        .and_then(|s| s.stream_len("faults:topic:load.generated"));
    drop(server);

    let mut line = report("redis", events, &tally);
    if let Some(entries) = entries {
        line.add("entries_in_stream", entries);
    }
    check_nothing_lost(events, &tally)?;
    let twins = tally.unflagged_twins();
    ensure(twins.is_empty(), || {
        let in_flight = twins
            .iter()
            .filter(|s| tally.in_flight_at_outage.contains(s))
            .count();
        format!(
            "{} events delivered twice as a first attempt — duplicates that are not \
             redeliveries — e.g. {:?} ({in_flight} of them published while the server \
             restarted); the topic stream holds {} entries for {events} events, so {}",
            twins.len(),
            &twins[..twins.len().min(10)],
            entries.map_or_else(|| "?".to_owned(), |n| n.to_string()),
            match entries {
                Some(n) if n > events as u64 => {
                    "a publish retried after the restart wrote an event a second time"
                }
                Some(_) => "the consumer side delivered an entry twice as new",
                None => "it is unknown which side duplicated",
            }
        )
    })?;
    line.print();
    Ok(())
}
