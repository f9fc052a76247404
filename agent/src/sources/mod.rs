//! The sources: each reads one kind of truth into the model, and only the model; none touches a
//! map. Services and EndpointSlices come from [`manifests`] or the Kubernetes API ([`kube`]),
//! both checked through [`objects`]; the overlay's members from flannel's etcd leases
//! ([`etcd`]); the next hops towards them from the kernel's tables ([`nexthops`]); this node's
//! pods from their network namespaces ([`pods`]).
//!
//! What every source shares is here: the model behind a lock, and the signal that wakes the
//! reconciler.

pub mod etcd;
#[cfg(test)]
mod fuzz;
pub mod kube;
pub mod manifests;
pub mod nexthops;
pub mod objects;
pub mod pods;

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::model::{Changed, Desired, Model};

/// The model, shared by the sources (writers) and the reconciler (reader).
#[derive(Default)]
pub struct ModelHandle {
    model: Mutex<Model>,
    changed: Notify,
}

impl ModelHandle {
    /// Runs `change` on the model; wakes the reconciler when it reports a change (and returns
    /// whether it did). Bursts of changes coalesce into one wake-up.
    pub fn update(&self, change: impl FnOnce(&mut Model) -> bool) -> bool {
        let changed = change(&mut self.model.lock().expect("model lock is never poisoned"));
        if changed {
            self.changed.notify_one();
        }
        changed
    }

    /// The state the model currently calls for.
    pub fn desired(&self) -> Arc<Desired> {
        self.model
            .lock()
            .expect("model lock is never poisoned")
            .desired()
    }

    /// The state the model calls for, and which service ports changed since the last call.
    pub fn take_changes(&self) -> (Arc<Desired>, Changed) {
        self.model
            .lock()
            .expect("model lock is never poisoned")
            .take_changes()
    }

    /// Waits until the model changes (returns at once if it changed since the last wait).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}
