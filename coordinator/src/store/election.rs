//! Leader election on any [`Store`]: one key, written only if absent, attached to the leader's
//! lease.
//!
//! Invariants (after GreptimeDB's and Dynamo's etcd elections):
//! - A candidate counts itself leader only after the put-if-absent transaction succeeded *and*
//!   the first keep-alive of its lease succeeded, so it never leads on a lease that already
//!   lapsed while the transaction was in flight.
//! - The lease is kept alive every TTL/3 on the election's own task (never on a request path
//!   that could starve it). Leadership ends, and `is_leader` turns false *before* anything
//!   else happens, when a keep-alive reports the lease gone, when no keep-alive succeeded for
//!   2/3 of the TTL (the lease may lapse any moment), or when the key is deleted or
//!   overwritten.
//! - Stopping (cancellation or [`Election::resign`]) revokes the lease, which deletes the key,
//!   so a follower takes over at once instead of after the TTL.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Compare, LeaseId, Op, Store, Txn, WatchEvent, WatchStream};
use crate::error::{Error, Result};

/// A background campaign for leadership of one key.
pub struct Election {
    leader: watch::Receiver<bool>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Election").field("is_leader", &self.is_leader()).finish_non_exhaustive()
    }
}

impl Election {
    /// Starts campaigning for `key` as `candidate` (the value written to the key) with leases
    /// of `ttl`. It keeps campaigning after a loss until `cancel` fires or it resigns.
    pub fn start(
        store: Arc<dyn Store>,
        key: impl Into<String>,
        candidate: impl Into<String>,
        ttl: Duration,
        cancel: &CancellationToken,
    ) -> Self {
        let (tx, leader) = watch::channel(false);
        let stop = cancel.child_token();
        let campaign = Campaign { store, key: key.into(), candidate: Bytes::from(candidate.into()), ttl, tx };
        let task = tokio::spawn(campaign.run(stop.clone()));
        Self { leader, stop, task: Some(task) }
    }

    /// Whether this candidate leads right now.
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// A receiver that sees every change of leadership (true: leading).
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.leader.clone()
    }

    /// Stops campaigning and gives up leadership (revoking the lease deletes the key).
    pub async fn resign(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take()
            && let Err(error) = task.await
        {
            warn!(%error, "election task failed");
        }
    }

    /// The candidate currently holding `key`, if any.
    pub async fn leader(store: &dyn Store, key: &str) -> Result<Option<String>> {
        Ok(store.get(key).await?.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        // The task notices, revokes its lease and exits on its own.
        self.stop.cancel();
    }
}

/// How a round of the campaign ended.
enum Round {
    /// The key became free while this candidate waited.
    Vacancy,
    /// This candidate led and lost the lease or the key.
    Lost,
    /// The campaign was stopped.
    Stopped,
}

struct Campaign {
    store: Arc<dyn Store>,
    key: String,
    candidate: Bytes,
    ttl: Duration,
    tx: watch::Sender<bool>,
}

impl Campaign {
    async fn run(self, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let lease = match self.store.grant_lease(self.ttl).await {
                Ok(lease) => lease,
                Err(error) => {
                    warn!(key = %self.key, %error, "election cannot grant a lease");
                    self.pause(&stop).await;
                    continue;
                }
            };
            let outcome = self.attempt(lease, &stop).await;
            let lost = matches!(outcome, Ok(Round::Lost));
            // Step down before anything else: the lease may already be gone.
            self.tx.send_if_modified(|leading| std::mem::replace(leading, false));
            match self.store.revoke_lease(lease).await {
                Ok(()) | Err(Error::LeaseExpired(_)) => {}
                Err(error) => warn!(key = %self.key, %lease, %error, "election cannot revoke its lease"),
            }
            match outcome {
                // A leader that just lost its lease is likely the one in trouble: give the
                // waiting candidates, which react at once, the first chance to take over.
                Ok(Round::Lost) if lost => self.pause(&stop).await,
                Ok(_) => {}
                Err(error) => {
                    warn!(key = %self.key, %error, "election attempt failed");
                    self.pause(&stop).await;
                }
            }
        }
    }

    /// Waits a third of the TTL (or until stopped) before retrying after an error.
    async fn pause(&self, stop: &CancellationToken) {
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(self.ttl / 3) => {}
        }
    }

    /// One round: take the key if it is free and lead while the lease lives; otherwise wait
    /// until the key is gone. Returns when it is time for the next round.
    async fn attempt(&self, lease: LeaseId, stop: &CancellationToken) -> Result<Round> {
        let txn = Txn::new().when([Compare::absent(&self.key)]).and_then([Op::put_with_lease(
            &self.key,
            self.candidate.clone(),
            lease,
        )]);
        let result = self.store.txn(txn).await?;
        let watch = self.store.watch(&self.key, result.revision).await?;
        if !result.succeeded {
            debug!(key = %self.key, "election key held by another candidate, waiting");
            self.wait_for_vacancy(watch, stop).await?;
            return Ok(Round::Vacancy);
        }
        self.store.keep_alive(lease).await?;
        self.tx.send_replace(true);
        info!(key = %self.key, %lease, "became leader");
        self.lead(lease, watch, stop).await
    }

    /// Waits until the key is deleted (or the campaign stops).
    async fn wait_for_vacancy(&self, mut watch: WatchStream, stop: &CancellationToken) -> Result<()> {
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                event = watch.next() => match event {
                    Some(Ok(WatchEvent::Delete { key, .. })) if key == self.key => return Ok(()),
                    Some(Ok(_)) => {}
                    // A broken watch only costs a fresh round, which re-checks the key.
                    Some(Err(error)) => return Err(error),
                    None => return Ok(()),
                },
            }
        }
    }

    /// Keeps the lease alive while leading; returns when leadership ends.
    async fn lead(&self, lease: LeaseId, mut watch: WatchStream, stop: &CancellationToken) -> Result<Round> {
        let mut ticks = tokio::time::interval(self.ttl / 3);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticks.tick().await; // The first tick is immediate; the first keep-alive just happened.
        let mut last_renewal = Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    info!(key = %self.key, "resigning leadership");
                    return Ok(Round::Stopped);
                }
                event = watch.next() => match event {
                    Some(Ok(WatchEvent::Put(kv))) if kv.key == self.key && kv.lease == Some(lease) => {}
                    Some(Ok(event)) if event.key() == self.key => {
                        warn!(key = %self.key, revision = event.revision(), "election key taken away, stepping down");
                        return Ok(Round::Lost);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => {
                        // The lease is the authority; without the watch we only notice a lost
                        // key at the next failed keep-alive.
                        warn!(key = %self.key, %error, "election watch failed, relying on keep-alives");
                        watch = Box::pin(futures::stream::pending());
                    }
                    None => watch = Box::pin(futures::stream::pending()),
                },
                _ = ticks.tick() => match self.store.keep_alive(lease).await {
                    Ok(_) => last_renewal = Instant::now(),
                    Err(Error::LeaseExpired(_)) => {
                        warn!(key = %self.key, %lease, "leader lease expired, stepping down");
                        return Ok(Round::Lost);
                    }
                    Err(error) if last_renewal.elapsed() >= self.ttl * 2 / 3 => {
                        warn!(key = %self.key, %error, "leader lease not renewed in time, stepping down");
                        return Err(error);
                    }
                    Err(error) => debug!(key = %self.key, %error, "leader keep-alive failed, retrying"),
                },
            }
        }
    }
}
