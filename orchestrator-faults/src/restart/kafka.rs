//! Kafka: a spare tansu (sqlite storage in a folder of its own) killed with SIGKILL mid-run
//! and started again on the same folder and port.
//!
//! A Kafka consumer group does not mark redeliveries: after the restart, records whose
//! offsets were not committed yet are fetched again. That they are redeliveries and not
//! copies is checked at the source: the topic must hold every event exactly once (the
//! producer is idempotent, so a batch sent again never lands twice).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use orchestrator_backends::kafka::{KafkaConfig, KafkaTransport};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use super::{Plan, check_nothing_lost, drive, report};
use crate::spare::{SpareTansu, tansu_binary};
use crate::{Failure, Res, ensure};

pub(crate) async fn run(events: usize) -> Result<(), Failure> {
    let binary = tansu_binary();
    if !binary.is_file() {
        return Err(Failure::CannotRun(format!(
            "no tansu at {} (`cargo xtask services up kafka` installs it; \
             ORCHESTRATOR_TANSU points elsewhere)",
            binary.display()
        )));
    }
    let broker = SpareTansu::start(binary)
        .map_err(|e| Failure::CannotRun(format!("cannot start a spare tansu: {e}")))?;
    Ok(scenario(broker, events).await?)
}

fn config(brokers: &str) -> Res<KafkaConfig> {
    Ok(KafkaConfig::new(brokers)
        .with_prefix("faults.")?
        .with_metadata_refresh_interval(Duration::from_millis(500))
        .with_commit_interval(Duration::from_millis(200))
        .with_fetch_wait(Duration::from_millis(20))
        .with_operation_timeout(Duration::from_secs(10))
        .with_subscribe_timeout(Duration::from_secs(30)))
}

async fn scenario(broker: SpareTansu, events: usize) -> Res {
    let brokers = broker.address();
    eprintln!("restart/kafka: {events} events, spare tansu at {brokers}");
    let transport = KafkaTransport::connect(config(&brokers)?).await?;
    let topic = "load.item";
    let plan = Plan {
        events,
        publishers: 2,
        batch: 200,
        prefetch: 256,
        deadline: Duration::from_secs(150 + events as u64 / 100),
    };
    let mut broker = Some(broker);
    let restart = async {
        let mut spare = broker.take().ok_or("the broker is gone")?;
        let (spare, downtime) = tokio::task::spawn_blocking(move || {
            let downtime = spare.kill_and_restart(Duration::from_secs(1));
            (spare, downtime)
        })
        .await?;
        broker = Some(spare);
        downtime
    };
    let tally = drive(Arc::new(transport.clone()), topic, "loaders", &plan, || {
        restart
    })
    .await?;

    let mut line = report("kafka", events, &tally);
    check_nothing_lost(events, &tally)?;
    let in_log = count_records(&brokers, &transport.kafka_topic(topic)?).await?;
    let copies = in_log.values().filter(|&&n| n > 1).count();
    drop(transport);
    drop(broker);
    ensure(in_log.len() == events, || {
        format!(
            "{} distinct events in the topic, {events} published",
            in_log.len()
        )
    })?;
    ensure(copies == 0, || {
        format!("{copies} events written to the topic more than once")
    })?;
    line.add("records_in_topic", in_log.values().sum::<usize>());
    line.print();
    Ok(())
}

/// Reads the whole topic with a plain consumer: sequence number → records.
///
/// Each partition is assigned by hand (no group, so no rebalance can start a partition
/// over) from its low watermark and read up to its high watermark as it is once the run is
/// over; each offset is counted once, however often a fetch hands it out.
async fn count_records(brokers: &str, topic: &str) -> Res<HashMap<u64, usize>> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("count-{}", uuid::Uuid::now_v7().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let timeout = Duration::from_secs(30);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    // Partition → (next offset to count, high watermark).
    let mut ranges: HashMap<i32, (i64, i64)> = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (low, high) = consumer.fetch_watermarks(topic, partition.id(), timeout)?;
        if high > low {
            ranges.insert(partition.id(), (low, high));
            assignment.add_partition_offset(topic, partition.id(), Offset::Offset(low))?;
        }
    }
    let records: i64 = ranges.values().map(|(low, high)| high - low).sum();
    consumer.assign(&assignment)?;
    let mut counts: HashMap<u64, usize> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let mut read = 0;
    while ranges.values().any(|(next, high)| next < high) {
        let message = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .map_err(|_| format!("read {read} of the {records} records in the topic in 300 s"))??;
        let Some((next, _)) = ranges.get_mut(&message.partition()) else {
            continue;
        };
        if message.topic() != topic || message.offset() < *next {
            continue;
        }
        *next = message.offset() + 1;
        let payload = message.payload().ok_or("a record without a value")?;
        let event = orchestrator_core::cloudevents::decode(payload)?;
        let seq = super::seq_of(&event).ok_or("a record without `seq`")?;
        *counts.entry(seq).or_default() += 1;
        read += 1;
    }
    Ok(counts)
}
