//! The maximum event size on every broker store and transport: an event over a configured
//! 1 KiB limit is refused before anything is written (a batch with one writes nothing), and
//! a message over the subscriber's limit, published by a process with a larger one, is
//! dead-lettered undecoded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[cfg(any(feature = "redis", feature = "rabbitmq", feature = "kafka"))]
use orchestrator_core::MaxEventSize;

/// The limit the tests configure.
#[cfg(any(feature = "redis", feature = "rabbitmq", feature = "kafka"))]
fn limit() -> MaxEventSize {
    MaxEventSize::new(1024).unwrap()
}

#[cfg(feature = "redis")]
mod redis_support;

#[cfg(feature = "redis")]
mod redis {
    use orchestrator_backends::redis::{RedisEventStore, RedisTransport};
    use orchestrator_core::testkit::{store, transport};

    use super::limit;
    use super::redis_support::{Cleanup, config, random_prefix, reachable};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_store_refuses_oversize_events() {
        let Some(url) = reachable().await else { return };
        let prefix = random_prefix();
        let _cleanup = Cleanup::new(&url, &prefix);
        let config = config(&url, &prefix).with_max_event_size(limit());
        let store = RedisEventStore::connect(config).await.unwrap();
        store::oversize_events_are_refused(&store, limit()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_transport_refuses_oversize_events_and_dead_letters_those_it_receives() {
        let Some(url) = reachable().await else { return };
        let prefix = random_prefix();
        let _cleanup = Cleanup::new(&url, &prefix);
        let small = RedisTransport::connect(config(&url, &prefix).with_max_event_size(limit()))
            .await
            .unwrap();
        transport::oversize_events_are_refused(&small, limit()).await;
        let large = RedisTransport::connect(config(&url, &prefix))
            .await
            .unwrap();
        transport::received_oversize_events_are_dead_lettered(&large, &small, limit()).await;
    }
}

#[cfg(feature = "rabbitmq")]
mod rabbitmq {
    use std::time::Duration;

    use orchestrator_backends::rabbitmq::{
        RabbitMqConfig, RabbitMqEventStore, RabbitMqStoreConfig, RabbitMqTransport,
    };
    use orchestrator_core::testkit::{services, store, transport};

    use super::limit;
    use super::rabbitmq_support::delete;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_store_refuses_oversize_events() {
        let stream = format!("test.size.{}.log", uuid::Uuid::now_v7().simple());
        let config = RabbitMqStoreConfig::new(services::amqp_url())
            .with_stream(stream.clone())
            .with_connect_timeout(Duration::from_secs(5))
            .with_max_event_size(limit());
        let store = match RabbitMqEventStore::connect(config).await {
            Ok(store) => store,
            Err(error) => {
                services::unreachable("RabbitMQ", &services::amqp_url(), &error);
                return;
            }
        };
        store::oversize_events_are_refused(&store, limit()).await;
        drop(store);
        delete(&[stream], &[]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_transport_refuses_oversize_events_and_dead_letters_those_it_receives() {
        let prefix = format!("test.size.{}", uuid::Uuid::now_v7().simple());
        // Queues expire a minute after their last consumer, should the test fail midway.
        let config = RabbitMqConfig::new(services::amqp_url())
            .with_exchange(format!("{prefix}.events"))
            .with_queue_prefix(prefix.clone())
            .with_queue_expiry(Duration::from_secs(60))
            .with_connect_timeout(Duration::from_secs(5));
        let small =
            match RabbitMqTransport::connect(config.clone().with_max_event_size(limit())).await {
                Ok(transport) => transport,
                Err(error) => {
                    services::unreachable("RabbitMQ", &services::amqp_url(), &error);
                    return;
                }
            };
        transport::oversize_events_are_refused(&small, limit()).await;
        let large = RabbitMqTransport::connect(config.clone()).await.unwrap();
        transport::received_oversize_events_are_dead_lettered(&large, &small, limit()).await;
        drop((small, large));
        delete(
            &[config.dead_letter_queue()],
            &[config.exchange().to_owned(), config.dead_letter_exchange()],
        )
        .await;
    }
}

#[cfg(feature = "kafka")]
mod kafka_support;
#[cfg(feature = "rabbitmq")]
mod rabbitmq_support;

#[cfg(feature = "kafka")]
mod kafka {
    use orchestrator_backends::kafka::{KafkaEventStore, KafkaTransport};
    use orchestrator_core::testkit::{store, transport};

    use super::kafka_support::{Live, config, live};
    use super::limit;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_store_refuses_oversize_events() {
        let Some(live) = live().await else { return };
        let Live {
            brokers, prefix, ..
        } = &live;
        let store = KafkaEventStore::connect(config(brokers, prefix).with_max_event_size(limit()))
            .await
            .unwrap();
        store::oversize_events_are_refused(&store, limit()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_transport_refuses_oversize_events_and_dead_letters_those_it_receives() {
        let Some(live) = live().await else { return };
        let Live {
            brokers,
            prefix,
            transport: large,
            ..
        } = &live;
        let small = KafkaTransport::connect(config(brokers, prefix).with_max_event_size(limit()))
            .await
            .unwrap();
        transport::oversize_events_are_refused(&small, limit()).await;
        transport::received_oversize_events_are_dead_lettered(large, &small, limit()).await;
    }
}
