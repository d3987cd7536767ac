//! [`RedisLease`]: a lease kept in one Redis key, for the processes that share a Redis store.

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use orchestrator_core::{Lease, Result};
use redis::Script;
use redis::aio::ConnectionManager;

use super::conn::redis_error;

/// Takes the lease when the key is free, extends it when it holds our token.
/// KEYS: the lease key. ARGV: token, time to live in milliseconds. Returns 1 when held.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
",
    )
});

/// Deletes the lease key if it holds our token. KEYS: the lease key. ARGV: token.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// A [`Lease`] kept in the Redis key `<prefix>lease:<name>`: the holder's token with a
/// time to live. Taking it is `SET NX PX` (in a script that also extends our own hold);
/// a holder that dies stops extending it, and the key expires after [`Lease::ttl`].
///
/// Each value has its own token (a fresh UUID with the process id), so two values compete
/// even inside one process. From [`RedisEventStore::lease`](orchestrator_core::EventStore::lease)
/// with a 5 s time to live, or [`RedisLease::new`].
#[derive(Clone)]
pub struct RedisLease {
    manager: ConnectionManager,
    key: String,
    token: String,
    ttl: Duration,
}

impl std::fmt::Debug for RedisLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLease")
            .field("key", &self.key)
            .field("token", &self.token)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl RedisLease {
    /// A candidate for the lease `key` that lasts `ttl` without renewal (at least 1 ms).
    pub fn new(manager: ConnectionManager, key: impl Into<String>, ttl: Duration) -> Self {
        Self {
            manager,
            key: key.into(),
            token: format!("{}/{}", std::process::id(), uuid::Uuid::now_v7()),
            ttl: ttl.max(Duration::from_millis(1)),
        }
    }

    /// This candidate's token, as the key holds it while this candidate holds the lease.
    pub fn token(&self) -> &str {
        &self.token
    }
}

#[async_trait]
impl Lease for RedisLease {
    fn describe(&self) -> String {
        format!("redis key `{}`", self.key)
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn try_acquire(&self) -> Result<bool> {
        let millis = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let held: i64 = ACQUIRE
            .key(&self.key)
            .arg(&self.token)
            .arg(millis)
            .invoke_async(&mut self.manager.clone())
            .await
            .map_err(redis_error)?;
        Ok(held == 1)
    }

    async fn release(&self) -> Result<()> {
        let _: i64 = RELEASE
            .key(&self.key)
            .arg(&self.token)
            .invoke_async(&mut self.manager.clone())
            .await
            .map_err(redis_error)?;
        Ok(())
    }
}
