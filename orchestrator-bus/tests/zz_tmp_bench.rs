#![allow(clippy::unwrap_used, missing_docs)]
use orchestrator_bus::InProcessTransport;
use orchestrator_core::{EventEnvelope, SubscribeOptions, Transport};
fn ev() -> EventEnvelope {
    EventEnvelope::new("a.b", &serde_json::json!({"order_id":"o-123456789","amount":123,"customer":"c-987654321","lines":[1,2,3],"note":"some text to make it around two hundred bytes long ok"})).unwrap()
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_bus() {
    for _ in 0..3 {
        let t = InProcessTransport::new();
        let mut sub = t
            .subscribe(SubscribeOptions::new("g", "a.b").unwrap())
            .await
            .unwrap();
        let n = 1_000_000u64;
        let evs: Vec<_> = (0..n).map(|_| ev()).collect();
        let start = std::time::Instant::now();
        let t2 = t.clone();
        let p = tokio::spawn(async move {
            for e in evs {
                t2.publish("a.b", e).await.unwrap();
            }
        });
        for _ in 0..n {
            sub.next().await.unwrap().unwrap().ack().await.unwrap();
        }
        p.await.unwrap();
        let el = start.elapsed();
        eprintln!("bus {n} in {el:?} = {:.0}/s", n as f64 / el.as_secs_f64());
    }
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_raw() {
    for _ in 0..3 {
        let n = 1_000_000u64;
        let evs: Vec<_> = (0..n).map(|_| ev()).collect();
        let (tx, rx) = async_channel::bounded(1024);
        let start = std::time::Instant::now();
        let p = tokio::spawn(async move {
            for e in evs {
                tx.send(e).await.unwrap();
            }
        });
        for _ in 0..n {
            let _e = rx.recv().await.unwrap();
        }
        p.await.unwrap();
        let el = start.elapsed();
        eprintln!(
            "async-channel {n} in {el:?} = {:.0}/s",
            n as f64 / el.as_secs_f64()
        );
        let evs: Vec<_> = (0..n).map(|_| ev()).collect();
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let start = std::time::Instant::now();
        let p = tokio::spawn(async move {
            for e in evs {
                tx.send(e).await.unwrap();
            }
        });
        for _ in 0..n {
            let _e = rx.recv().await.unwrap();
        }
        p.await.unwrap();
        let el = start.elapsed();
        eprintln!(
            "tokio mpsc {n} in {el:?} = {:.0}/s",
            n as f64 / el.as_secs_f64()
        );
    }
}
