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
    drop(server);

    let line = report("redis", events, &tally);
    check_nothing_lost(events, &tally)?;
    let twins = tally.unflagged_twins();
    ensure(twins.is_empty(), || {
        format!(
            "{} events delivered twice as a first attempt (published twice, or delivered \
             twice as new): duplicates that are not redeliveries, e.g. {:?}",
            twins.len(),
            &twins[..twins.len().min(10)]
        )
    })?;
    line.print();
    Ok(())
}
