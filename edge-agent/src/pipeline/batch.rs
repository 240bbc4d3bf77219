//! Batching: records that arrive together are scored together.
//!
//! A batch closes when it holds `max_batch` records or `max_wait` after its first record
//! *arrived* (not after it was received here), whichever comes first. Under a backlog the
//! deadline has already passed, so a batch takes whatever is queued, up to `max_batch`,
//! without waiting: batching then costs no latency at all.

use std::time::Duration;

use tokio::sync::mpsc;

use super::RawRecord;

/// The next batch from `rx`: waits for a first record, then collects more until `max_batch`
/// or `max_wait` after that record's arrival. `None` once the channel is closed and empty.
/// Cancel-safe only between batches (a half-collected batch is lost if the future is
/// dropped), so run it on its own task.
pub async fn next_batch(
    rx: &mut mpsc::Receiver<RawRecord>,
    max_batch: usize,
    max_wait: Duration,
) -> Option<Vec<RawRecord>> {
    let first = rx.recv().await?;
    let deadline = first.arrived + max_wait;
    let max_batch = max_batch.max(1);
    let mut batch = Vec::with_capacity(max_batch.min(1024));
    batch.push(first);
    while batch.len() < max_batch {
        // Take what is already queued without touching the timer.
        match rx.try_recv() {
            Ok(r) => {
                batch.push(r);
                continue;
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {}
        }
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(r)) => batch.push(r),
            Ok(None) | Err(_) => break,
        }
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    fn raw(i: u8) -> RawRecord {
        RawRecord { bytes: vec![i].into(), arrived: Instant::now() }
    }

    #[tokio::test]
    async fn respects_max_batch_and_max_wait() {
        let (tx, mut rx) = mpsc::channel(64);
        for i in 0..10 {
            tx.send(raw(i)).await.unwrap();
        }
        // A backlog: full batches at once, then the rest without waiting out max_wait.
        let start = Instant::now();
        let b = next_batch(&mut rx, 4, Duration::from_secs(5)).await.unwrap();
        assert_eq!(b.iter().map(|r| r.bytes[0]).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        assert_eq!(next_batch(&mut rx, 4, Duration::from_secs(5)).await.unwrap().len(), 4);
        assert!(start.elapsed() < Duration::from_secs(2));

        // Two queued and a third arriving long after max_wait: the batch closes at the deadline.
        tx.send(raw(20)).await.unwrap();
        let tx2 = tx.clone();
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            tx2.send(raw(21)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx2.send(raw(22)).await.unwrap();
        });
        let start = Instant::now();
        let b = next_batch(&mut rx, 8, Duration::from_millis(100)).await.unwrap();
        assert_eq!(b.iter().map(|r| r.bytes[0]).collect::<Vec<_>>(), vec![8, 9, 20]);
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(95) && waited < Duration::from_millis(900), "{waited:?}");
        // A record arriving within max_wait of the first joins its batch.
        let b = next_batch(&mut rx, 8, Duration::from_millis(500)).await.unwrap();
        assert_eq!(b.iter().map(|r| r.bytes[0]).collect::<Vec<_>>(), vec![21, 22]);
        late.await.unwrap();
        drop(tx);
        assert!(next_batch(&mut rx, 8, Duration::from_millis(100)).await.is_none());
    }
}
