//! The link's writer, on both ends: frames go out in as few writes as the load allows.

use futures::{Sink, SinkExt};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::encode;

/// Most frames coalesced into one flush.
const WRITE_BATCH: usize = 64;

/// Writes the frames `rx` yields into `sink` (each as the message `to_msg` makes of its text)
/// until either side ends or a write fails. Frames queued together go out in one flush. When
/// the queue runs dry, the writer first lets the tasks that are ready to run now — other
/// requests, which tokio would otherwise run after it — queue their frames, so under load one
/// write carries many requests' frames (on one core this took the link's writes from ~1 per
/// request to ~0.1). No timer: a lone frame waits only for the tasks already runnable.
pub async fn write_frames<F, M, S>(
    mut rx: mpsc::Receiver<F>,
    sink: &mut S,
    to_msg: impl Fn(String) -> M,
) where
    F: Serialize,
    S: Sink<M> + Unpin,
{
    while let Some(frame) = rx.recv().await {
        let mut next = Some(frame);
        let mut queued = 0;
        let mut yielded = false;
        while let Some(f) = next.take() {
            match encode(&f) {
                Ok(text) => {
                    if sink.feed(to_msg(text)).await.is_err() {
                        return;
                    }
                    queued += 1;
                }
                Err(e) => tracing::error!(error = %e, "link frame not sent"),
            }
            if queued < WRITE_BATCH {
                next = rx.try_recv().ok();
                if next.is_none() && !yielded {
                    yielded = true;
                    tokio::task::yield_now().await;
                    next = rx.try_recv().ok();
                }
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// Records each flush's messages.
    #[derive(Default)]
    struct Flushes {
        pending: Vec<String>,
        flushed: Vec<Vec<String>>,
    }

    impl Sink<String> for Flushes {
        type Error = ();
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
            Poll::Ready(Ok(()))
        }
        fn start_send(mut self: Pin<&mut Self>, item: String) -> Result<(), ()> {
            self.pending.push(item);
            Ok(())
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
            if !self.pending.is_empty() {
                let batch = std::mem::take(&mut self.pending);
                self.flushed.push(batch);
            }
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
            self.poll_flush(cx)
        }
    }

    /// Ten requests that become ready together (as when one read of the socket wakes them)
    /// each queue a frame: they share a flush or two, not one each — tokio runs a task woken by
    /// a running one next, so without the writer's yield it flushed after every request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn frames_of_requests_ready_together_share_a_write() {
        let (tx, rx) = mpsc::channel::<u32>(100);
        let writer = tokio::spawn(async move {
            let mut sink = Flushes::default();
            write_frames(rx, &mut sink, |t| t).await;
            sink.flushed
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        tokio::spawn(async move {
            for i in 0..10u32 {
                let tx = tx.clone();
                tokio::spawn(async move { tx.send(i).await });
            }
        })
        .await
        .unwrap_or_default();
        let flushed = writer.await.unwrap_or_default();
        let mut frames: Vec<u32> = flushed
            .iter()
            .flatten()
            .filter_map(|t| t.parse().ok())
            .collect();
        frames.sort_unstable();
        assert_eq!(frames, (0..10).collect::<Vec<_>>());
        assert!(flushed.len() <= 2, "{} flushes: {flushed:?}", flushed.len());
    }

    /// A lone frame is written without waiting for more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_lone_frame_is_written_at_once() {
        let (tx, rx) = mpsc::channel::<u32>(4);
        let (seen_tx, mut seen) = mpsc::channel::<usize>(4);
        struct Probe(mpsc::Sender<usize>, usize);
        impl Sink<String> for Probe {
            type Error = ();
            fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
                Poll::Ready(Ok(()))
            }
            fn start_send(mut self: Pin<&mut Self>, _: String) -> Result<(), ()> {
                self.1 += 1;
                Ok(())
            }
            fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
                let n = std::mem::take(&mut self.1);
                if n > 0 {
                    let _ = self.0.try_send(n);
                }
                Poll::Ready(Ok(()))
            }
            fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
                self.poll_flush(cx)
            }
        }
        let writer = tokio::spawn(async move {
            let mut sink = Probe(seen_tx, 0);
            write_frames(rx, &mut sink, |t| t).await;
        });
        tx.send(1).await.unwrap_or_default();
        // Flushed while the sender is still open: no waiting for a batch to fill (a writer
        // that waited would fail here, not hang the test).
        let first = tokio::time::timeout(std::time::Duration::from_secs(5), seen.recv()).await;
        assert_eq!(first, Ok(Some(1)));
        drop(tx);
        writer.await.unwrap_or_default();
    }
}
