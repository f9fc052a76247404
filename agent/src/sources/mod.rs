//! The sources: each reads one kind of truth into the model, and only the model; none touches a
//! map. Services and EndpointSlices come from [`manifests`] or the Kubernetes API ([`kube`]),
//! both checked through [`objects`]; the overlay's members from flannel's leases, in etcd
//! ([`etcd`]) or in Node annotations ([`kube_subnets`]), both in [`flannel`]'s schema; the next hops towards them from the kernel's tables ([`nexthops`]); this node's
//! pods from their network namespaces ([`pods`]).
//!
//! Every source has the same shape: a first complete read (a list, a scan, the leases) before
//! the agent programs anything, then a supervised task that follows updates. A service source
//! feeds the model through the same calls: [`objects::triage`] decides whether an object is
//! served, ignored or rejected, [`objects::Kind::apply`] and [`objects::Kind::delete`] change one
//! object, and [`reset`] brings the model to a complete snapshot (a relist, a rescan).
//!
//! What every source shares is here: the model behind a lock, the signal that wakes the
//! reconciler, and the snapshot diff.

pub mod etcd;
pub mod flannel;
#[cfg(test)]
mod fuzz;
pub mod kube;
pub mod kube_subnets;
pub mod manifests;
pub mod nexthops;
pub mod objects;
pub mod pods;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use tokio::sync::Notify;

use crate::{
    model::{ChangeCounts, Changes, Desired, Model},
    sources::objects::{Kind, ObjectRef},
};

/// An error and its causes, as one line (for a source's log lines while it retries).
pub(crate) fn with_causes(error: &dyn std::error::Error) -> String {
    std::iter::successors(Some(error), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

/// Brings the model's objects of kind `K` from what this source had put in it (`before`) to
/// its complete snapshot `after`: what `after` lacks is deleted, the rest applied (the model
/// tells unchanged objects apart). Returns whether anything changed.
pub fn reset<'a, K: Kind>(
    model: &mut Model,
    before: impl IntoIterator<Item = &'a ObjectRef>,
    after: BTreeMap<ObjectRef, K::Spec>,
) -> bool {
    let gone: BTreeSet<&ObjectRef> = before
        .into_iter()
        .filter(|name| !after.contains_key(*name))
        .collect();
    let mut changed = false;
    for name in gone {
        changed |= K::delete(model, name);
    }
    for (name, spec) in after {
        changed |= K::apply(model, name, spec);
    }
    changed
}

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

    /// The state the model calls for, and what changed since the last call.
    pub fn take_changes(&self) -> Changes {
        self.model
            .lock()
            .expect("model lock is never poisoned")
            .take_changes()
    }

    /// The Service and EndpointSlice changes the model took so far.
    pub fn change_counts(&self) -> ChangeCounts {
        self.model
            .lock()
            .expect("model lock is never poisoned")
            .change_counts()
    }

    /// Waits until the model changes (returns at once if it changed since the last wait).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;

    use super::*;
    use crate::model::tests::{nginx_service, object};

    #[test]
    fn a_snapshot_deletes_what_it_lacks_and_applies_the_rest_once() {
        let mut model = Model::default();
        let (kept, gone, new) = (
            object("default", "kept"),
            object("default", "gone"),
            object("default", "new"),
        );
        for name in [&kept, &gone] {
            model.set_service(name.clone(), nginx_service());
        }
        let mut moved = nginx_service();
        moved.ports[0].port = 8443;
        let snapshot = BTreeMap::from([(kept.clone(), moved), (new.clone(), nginx_service())]);
        assert!(reset::<Service>(
            &mut model,
            [&kept, &gone],
            snapshot.clone()
        ));
        let desired = model.desired();
        let served: BTreeSet<(&ObjectRef, u16)> = desired
            .ports
            .iter()
            .flat_map(|(name, port)| {
                port.frontends
                    .keys()
                    .map(move |key| (&name.service, key.port))
            })
            .collect();
        assert_eq!(served, BTreeSet::from([(&kept, 8443), (&new, 4432)]));
        assert!(
            !reset::<Service>(&mut model, snapshot.keys(), snapshot.clone()),
            "the same snapshot again changes nothing"
        );
    }
}
