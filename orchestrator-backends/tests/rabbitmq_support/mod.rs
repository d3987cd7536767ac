//! What the RabbitMQ tests share: deleting the queues and exchanges a test declared.
#![allow(dead_code, unreachable_pub)]

use std::sync::{Arc, Mutex};

use orchestrator_core::testkit::services;

/// Deletes `queues` and `exchanges` on the live broker (nothing if it does not answer).
pub async fn delete(queues: &[String], exchanges: &[String]) {
    let url = services::amqp_url();
    let Ok(connection) =
        lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await
    else {
        return;
    };
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    for queue in queues {
        let _ = channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
    }
    for exchange in exchanges {
        let _ = channel
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await;
    }
    let _ = connection.close(200, "cleaned up".into()).await;
}

/// Deletes the named queues and exchanges when dropped, also when a test panics: on a
/// thread of its own with its own runtime, because `Drop` cannot await.
#[derive(Default)]
pub struct Cleanup {
    pub queues: Arc<Mutex<Vec<String>>>,
    pub exchanges: Arc<Mutex<Vec<String>>>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut *self.queues.lock().unwrap_or_else(|e| e.into_inner()));
        let exchanges =
            std::mem::take(&mut *self.exchanges.lock().unwrap_or_else(|e| e.into_inner()));
        if queues.is_empty() && exchanges.is_empty() {
            return;
        }
        let cleaner = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(delete(&queues, &exchanges));
        });
        let _ = cleaner.join();
    }
}
