//! The agent's long-running tasks, supervised: each has a name and a tracing span, and the end
//! of any of them is noticed. Every task here is meant to run for as long as the agent does,
//! so an end (an error, a panic, a cancellation, or a return of a task that never should) is
//! fatal: the agent stops with the task's name, and its DaemonSet starts a new one, which adopts
//! the pinned dataplane that kept forwarding meanwhile. Restarting a task in place would need
//! its state rebuilt from scratch anyway, which is exactly what a new agent does.

use std::{collections::HashMap, convert::Infallible, future::Future};

use tokio::task::{self, AbortHandle, JoinError, JoinSet};
use tracing::Instrument as _;

/// How a supervised task ended.
#[derive(Debug, thiserror::Error)]
pub enum TaskEnded {
    #[error("the {name} task failed")]
    Failed {
        name: &'static str,
        #[source]
        error: anyhow::Error,
    },
    #[error("the {name} task panicked: {message}")]
    Panicked { name: &'static str, message: String },
    #[error("the {name} task was cancelled")]
    Cancelled { name: &'static str },
}

impl TaskEnded {
    /// The name of the task that ended.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::Failed { name, .. } | Self::Panicked { name, .. } | Self::Cancelled { name } => {
                name
            }
        }
    }
}

/// The agent's named tasks. Dropping it aborts every task still running.
#[derive(Default)]
pub struct Tasks {
    running: JoinSet<anyhow::Result<Infallible>>,
    names: HashMap<task::Id, &'static str>,
}

impl Tasks {
    /// Starts `task` under `name`, in a span of that name. It runs until it fails or the agent
    /// stops: its type says it never returns otherwise.
    pub fn spawn<F>(&mut self, name: &'static str, task: F) -> AbortHandle
    where
        F: Future<Output = anyhow::Result<Infallible>> + Send + 'static,
    {
        let handle = self
            .running
            .spawn(task.instrument(tracing::info_span!("task", name)));
        self.names.insert(handle.id(), name);
        handle
    }

    /// The names of the tasks started, sorted.
    #[must_use]
    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.names.values().copied().collect();
        names.sort_unstable();
        names
    }

    /// Waits until a task ends, and says which and how. With no task running, waits forever.
    pub async fn first_end(&mut self) -> TaskEnded {
        let Some(ended) = self.running.join_next_with_id().await else {
            return std::future::pending().await;
        };
        match ended {
            Ok((id, Err(error))) => TaskEnded::Failed {
                name: self.name(id),
                error,
            },
            Err(e) => self.why(e),
        }
    }

    fn name(&self, id: task::Id) -> &'static str {
        self.names.get(&id).copied().unwrap_or("unnamed")
    }

    fn why(&self, e: JoinError) -> TaskEnded {
        let name = self.name(e.id());
        match e.try_into_panic() {
            Ok(payload) => TaskEnded::Panicked {
                name,
                message: panic_message(payload.as_ref()),
            },
            Err(_) => TaskEnded::Cancelled { name },
        }
    }
}

/// What a panic said, when it said it with a string (as `panic!` and `expect` do).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned())
}

/// A task that runs forever, as one the supervisor can hold: `forever(task)` for a loop whose
/// function returns [`Infallible`].
pub async fn forever(task: impl Future<Output = Infallible>) -> anyhow::Result<Infallible> {
    Ok(task.await)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn idle() -> Infallible {
        std::future::pending().await
    }

    #[tokio::test]
    async fn a_failed_task_is_named_with_its_error() {
        let mut tasks = Tasks::default();
        tasks.spawn("lease keeper", forever(idle()));
        tasks.spawn("service watcher", async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Err(anyhow::anyhow!("the watch stream ended"))
        });
        let ended = tasks.first_end().await;
        assert_eq!(ended.name(), "service watcher");
        assert_eq!(
            format!("{:#}", anyhow::Error::from(ended)),
            "the service watcher task failed: the watch stream ended"
        );
    }

    #[tokio::test]
    async fn a_panicking_task_is_named_with_its_message() {
        let mut tasks = Tasks::default();
        tasks.spawn("reconciler", forever(idle()));
        tasks.spawn("conntrack collector", async {
            panic!("conntrack work does not panic");
        });
        let ended = tasks.first_end().await;
        assert!(
            matches!(ended, TaskEnded::Panicked { name: "conntrack collector", ref message } if message == "conntrack work does not panic"),
            "{ended:?}"
        );
    }

    #[tokio::test]
    async fn a_killed_task_is_noticed() {
        let mut tasks = Tasks::default();
        tasks.spawn("reconciler", forever(idle()));
        let lease_keeper = tasks.spawn("lease keeper", forever(idle()));
        tokio::time::sleep(Duration::from_millis(10)).await;
        lease_keeper.abort();
        let ended = tokio::time::timeout(Duration::from_secs(5), tasks.first_end())
            .await
            .expect("the killed task's end is reported at once");
        assert!(
            matches!(
                ended,
                TaskEnded::Cancelled {
                    name: "lease keeper"
                }
            ),
            "{ended:?}"
        );
    }

    #[tokio::test]
    async fn the_other_tasks_stop_with_the_supervisor() {
        let mut tasks = Tasks::default();
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<()>(1);
        tasks.spawn("holder", async move {
            let _held = sender;
            std::future::pending().await
        });
        assert_eq!(tasks.names(), ["holder"]);
        drop(tasks);
        // The sender is dropped with the aborted task, closing the channel.
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), receiver.recv())
                .await
                .expect("the task is aborted"),
            None
        );
    }
}
