//! Graceful-then-forced shutdown shared by every accept loop and long-lived task.
//!
//! A [`Trigger`] starts the drain; each task holds a [`Watch`], notices the signal, finishes
//! its in-flight work and drops the watch. [`Trigger::drain`] waits until every watch is gone or
//! the deadline passes, whichever is first.

use std::time::Duration;

use tokio::sync::watch;

/// Starts a drain. Dropping it without calling [`Trigger::drain`] also signals the watchers.
#[derive(Debug)]
pub struct Trigger {
    tx: watch::Sender<bool>,
}

/// Observes a drain. Clone one per task; drop it when the task is done.
#[derive(Debug, Clone)]
pub struct Watch {
    rx: watch::Receiver<bool>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every watcher finished before the deadline.
    Graceful,
    /// The deadline passed with watchers still running; callers should force-close them.
    Forced,
}

/// A new trigger and its first watch.
pub fn channel() -> (Trigger, Watch) {
    let (tx, rx) = watch::channel(false);
    (Trigger { tx }, Watch { rx })
}

// === impl Trigger ===

impl Trigger {
    /// Signals every watch, then waits up to `deadline` for all of them to be dropped.
    pub async fn drain(self, deadline: Duration) -> Outcome {
        let _ = self.tx.send(true);
        match tokio::time::timeout(deadline, self.tx.closed()).await {
            Ok(()) => Outcome::Graceful,
            Err(_) => Outcome::Forced,
        }
    }
}

// === impl Watch ===

impl Watch {
    /// Resolves once the drain has started (immediately if it already has, or if the trigger is
    /// gone).
    pub async fn signaled(&mut self) {
        let _ = self.rx.wait_for(|draining| *draining).await;
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        *self.rx.borrow() || self.rx.has_changed().is_err()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn graceful_when_watchers_finish_forced_at_the_deadline() {
        let (trigger, watch) = channel();
        let mut worker = watch.clone();
        drop(watch);
        let task = tokio::spawn(async move {
            worker.signaled().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(worker);
        });
        assert_eq!(
            trigger.drain(Duration::from_secs(5)).await,
            Outcome::Graceful
        );
        task.await.unwrap();

        let (trigger, watch) = channel();
        let stuck = watch.clone();
        assert!(!stuck.is_draining());
        drop(watch);
        let outcome = trigger.drain(Duration::from_secs(5)).await;
        assert_eq!(
            outcome,
            Outcome::Forced,
            "a watcher that never finishes forces the drain"
        );
        assert!(stuck.is_draining());
    }
}
