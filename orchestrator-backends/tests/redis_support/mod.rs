//! What the Redis tests share: reaching the live Redis, random key prefixes, and cleanup.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use orchestrator_backends::redis::RedisConfig;
use orchestrator_core::testkit::services;

/// The live Redis's URL, or `None` (after reporting why) when it does not answer `PING`.
pub async fn reachable() -> Option<String> {
    let url = services::redis_url();
    match ping(&url).await {
        Ok(()) => Some(url),
        Err(error) => {
            services::unreachable("Redis", &url, &error);
            None
        }
    }
}

async fn ping(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let attempt = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(Duration::from_secs(3), attempt).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer to PING within 3 s".into()),
    }
}

/// A fresh key prefix, so tests never see each other's keys.
pub fn random_prefix() -> String {
    format!("orchestrator-test:{}:", uuid::Uuid::now_v7().simple())
}

/// A config for `url` under `prefix`.
pub fn config(url: &str, prefix: &str) -> RedisConfig {
    RedisConfig::new(url).unwrap().with_prefix(prefix)
}

/// A raw redis-rs connection, for writing what other clients would write.
pub async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Deletes every key under its prefix when dropped — also when the test panics.
pub struct Cleanup {
    pub url: String,
    pub prefix: String,
}

impl Cleanup {
    pub fn new(url: &str, prefix: &str) -> Self {
        Self {
            url: url.to_owned(),
            prefix: prefix.to_owned(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let deleted = delete_prefix_blocking(&self.url, &self.prefix);
        match deleted {
            Ok(n) => eprintln!("cleanup: deleted {n} keys under `{}`", self.prefix),
            Err(e) => eprintln!("cleanup of `{}` failed: {e}", self.prefix),
        }
    }
}

/// `SCAN` + `DEL` every key under `prefix`, on a blocking connection (usable from `Drop`).
pub fn delete_prefix_blocking(url: &str, prefix: &str) -> redis::RedisResult<usize> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(3))?;
    let mut deleted = 0;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query(&mut conn)?;
        if !keys.is_empty() {
            deleted += redis::cmd("DEL").arg(&keys).query::<usize>(&mut conn)?;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// How many keys exist under `prefix`.
pub async fn count_keys(url: &str, prefix: &str) -> usize {
    let mut conn = raw(url).await;
    let mut cursor: u64 = 0;
    let mut count = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        count += keys.len();
        if next == 0 {
            return count;
        }
        cursor = next;
    }
}

/// An `XRANGE` reply: entry ids with their fields.
pub type RawEntries = Vec<(String, Vec<(String, Vec<u8>)>)>;
