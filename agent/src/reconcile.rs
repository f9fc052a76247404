//! The reconciler: the only writer of the service and overlay maps. It diffs the desired state
//! against what it has applied and writes the difference in an order that never lets the
//! datapath see a half-written service:
//! - a set's membership entry goes before the slot it describes changes, and comes after the
//!   slot is written (session affinity only returns clients to members);
//! - new endpoint slots before the frontend counts that expose them, frontend counts lowered
//!   before the slots beyond them are deleted;
//! - a frontend's source ranges before the frontend that needs them, and removed after it;
//! - a removed service's frontends before its sets, a set's slots before its name;
//! - an overlay member before the remote subnets that send to it, and removed after them, so
//!   this node never encapsulates to a node whose replies it would refuse.
//!
//! Applied state is a mirror of the maps, updated only after each write succeeds, so a failed
//! write (a full map) leaves a consistent dataplane and is retried on the next pass.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use weft_common::maps::{
    EndpointKey, EndpointMemberKey, EndpointValue, RemoteNode, ServiceKey, ServiceValue, Vtep,
    endpoint_scope, service_flags,
};

use crate::{
    datapath::maps::{DatapathMaps, MapReadError, MapWriteError, decode_name, encode_name},
    model::{Changed, Desired, DesiredPort, FrontendPolicy, FrontendSpec, Scope, ServicePortName},
    sources::objects::ObjectRef,
};

/// What the maps hold for one endpoint set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct AppliedSet {
    id: u32,
    /// Slot `i`; `None` where the map has no entry.
    slots: Vec<Option<EndpointValue>>,
    /// Membership entries, with the slot each names.
    members: BTreeMap<EndpointValue, u32>,
}

impl AppliedSet {
    /// Slots present from 0 without a gap: what a frontend may expose.
    fn dense(&self) -> u32 {
        self.slots.iter().take_while(|slot| slot.is_some()).count() as u32
    }

    /// Whether the set holds exactly `want`, once each, densely, with membership to match.
    fn holds(&self, want: &BTreeSet<EndpointValue>) -> bool {
        self.slots.len() == want.len()
            && self
                .slots
                .iter()
                .all(|slot| slot.is_some_and(|e| want.contains(&e)))
            && self.slots.iter().flatten().collect::<BTreeSet<_>>().len() == want.len()
            && self.members.len() == want.len()
            && self
                .slots
                .iter()
                .enumerate()
                .all(|(slot, e)| e.is_some_and(|e| self.members.get(&e) == Some(&(slot as u32))))
    }
}

/// What the maps hold for one service port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct AppliedPort {
    /// Its endpoint sets.
    sets: BTreeMap<Scope, AppliedSet>,
    /// Each frontend with the value written in it.
    frontends: BTreeMap<ServiceKey, ServiceValue>,
    /// Source ranges written, per frontend.
    source_ranges: BTreeMap<ServiceKey, BTreeSet<Ipv4Net>>,
}

/// What one reconcile pass did.
#[derive(Debug, Default)]
pub struct Report {
    pub added: Vec<ServicePortName>,
    pub updated: Vec<ServicePortName>,
    pub removed: Vec<ServicePortName>,
    /// Service ports left as they were (or not programmed at all) because a write failed.
    pub failed: Vec<(ServicePortName, MapWriteError)>,
    /// The node's own entries (remote subnets, overlay members, pod namespaces) written or
    /// removed.
    pub node_changes: usize,
    /// The node's own entries (a subnet, a member or a pod namespace, by name) whose write
    /// failed.
    pub node_failed: Vec<(String, MapWriteError)>,
}

impl Report {
    /// Whether the pass changed nothing and nothing failed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.updated.is_empty()
            && self.removed.is_empty()
            && self.failed.is_empty()
            && self.node_changes == 0
            && self.node_failed.is_empty()
    }
}

/// What the maps hold, counted: for metrics and map pressure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    pub service_ports: usize,
    pub frontends: usize,
    pub endpoint_slots: usize,
}

/// Endpoint set ids: never 0, reused after release, but never within the pass that released
/// them, so a packet that read a removed set's id cannot find another set's slots.
#[derive(Debug, Default)]
struct Ids {
    next: u32,
    free: Vec<u32>,
    cooling: Vec<u32>,
}

impl Ids {
    fn from_used(used: &BTreeSet<u32>) -> Self {
        let last = used.last().copied().unwrap_or(0);
        Self {
            next: last + 1,
            free: (1..last).filter(|id| !used.contains(id)).rev().collect(),
            cooling: Vec::new(),
        }
    }

    fn take(&mut self) -> u32 {
        self.free.pop().unwrap_or_else(|| {
            let id = self.next.max(1);
            self.next = id + 1;
            id
        })
    }

    fn release(&mut self, id: u32) {
        self.cooling.push(id);
    }

    /// Makes the ids released in earlier passes reusable.
    fn thaw(&mut self) {
        self.free.append(&mut self.cooling);
    }
}

/// The single writer of the service and overlay maps.
pub struct Reconciler<M> {
    maps: M,
    applied: BTreeMap<ServicePortName, AppliedPort>,
    /// Which service port each frontend in the map belongs to.
    owners: BTreeMap<ServiceKey, ServicePortName>,
    ids: Ids,
    subnets: BTreeMap<Ipv4Net, RemoteNode>,
    vteps: BTreeMap<Ipv4Addr, Vtep>,
    pod_namespaces: BTreeMap<u64, Ipv4Addr>,
    /// Service ports whose last write failed: looked at again on every pass.
    retry: BTreeSet<ServicePortName>,
}

impl<M: DatapathMaps> Reconciler<M> {
    /// Starts from whatever the maps already hold (pinned by an earlier agent), so a restart
    /// rewrites only what changed and established connections keep their endpoints.
    pub fn adopt(maps: M) -> Result<Self, MapReadError> {
        let dump = maps.dump()?;
        let mut sets: BTreeMap<u32, AppliedSet> = BTreeMap::new();
        for (key, value) in &dump.endpoints {
            let set = sets.entry(key.service_id).or_default();
            let slot = key.slot as usize;
            if set.slots.len() <= slot {
                set.slots.resize(slot + 1, None);
            }
            set.slots[slot] = Some(*value);
        }
        for (key, slot) in &dump.members {
            let endpoint = EndpointValue {
                addr: key.addr,
                port: key.port,
                _pad: 0,
            };
            sets.entry(key.set_id)
                .or_default()
                .members
                .insert(endpoint, *slot);
        }
        for (id, set) in &mut sets {
            set.id = *id;
        }
        let mut named: BTreeMap<u32, (ServicePortName, Scope)> = dump
            .names
            .iter()
            .map(|(id, name)| {
                let (port, scope) = decode_name(name);
                // A scope this build does not know (a newer weft's) makes the set a stray.
                let named = scope_from_wire(scope).map_or_else(
                    || (stray_name(*id, "unknown scope"), Scope::Cluster),
                    |scope| (port, scope),
                );
                (*id, named)
            })
            .collect();
        // Ids referenced without a name: an agent killed mid-write or mid-removal. They get a
        // name no desired port has, so the first pass removes them.
        let referenced = dump
            .frontends
            .iter()
            .flat_map(|(_, value)| [value.id, value.cluster_id])
            .filter(|id| *id != 0)
            .chain(sets.keys().copied())
            .collect::<BTreeSet<_>>();
        for id in referenced {
            named
                .entry(id)
                .or_insert_with(|| (stray_name(id, "no name"), Scope::Cluster));
        }
        let mut applied: BTreeMap<ServicePortName, AppliedPort> = BTreeMap::new();
        let mut port_of_set: BTreeMap<u32, ServicePortName> = BTreeMap::new();
        for (id, (mut name, scope)) in named {
            if applied
                .get(&name)
                .is_some_and(|port| port.sets.contains_key(&scope))
            {
                name = stray_name(id, "duplicate name");
            }
            let set = AppliedSet {
                id,
                ..sets.remove(&id).unwrap_or_default()
            };
            applied
                .entry(name.clone())
                .or_default()
                .sets
                .insert(scope, set);
            port_of_set.insert(id, name);
        }
        for (key, value) in &dump.frontends {
            let owner = port_of_set
                .get(&value.id)
                .cloned()
                .unwrap_or_else(|| stray_name(0, "frontend without a set"));
            applied
                .entry(owner)
                .or_default()
                .frontends
                .insert(*key, *value);
        }
        let owners: BTreeMap<ServiceKey, ServicePortName> = applied
            .iter()
            .flat_map(|(name, port)| port.frontends.keys().map(move |key| (*key, name.clone())))
            .collect();
        let mut stray_ranges = AppliedPort::default();
        for (frontend, range) in &dump.source_ranges {
            let port = match owners.get(frontend) {
                Some(owner) => applied.get_mut(owner).expect("owners are applied"),
                None => &mut stray_ranges,
            };
            port.source_ranges
                .entry(*frontend)
                .or_default()
                .insert(*range);
        }
        if !stray_ranges.source_ranges.is_empty() {
            applied.insert(stray_name(0, "source ranges of no frontend"), stray_ranges);
        }
        let used = applied
            .values()
            .flat_map(|port| port.sets.values().map(|set| set.id))
            .collect();
        Ok(Self {
            maps,
            applied,
            owners,
            ids: Ids::from_used(&used),
            subnets: dump.subnets.into_iter().collect(),
            vteps: dump.vteps.into_iter().collect(),
            pod_namespaces: dump.pod_namespaces.into_iter().collect(),
            retry: BTreeSet::new(),
        })
    }

    /// The maps, for reads.
    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// What is programmed, counted.
    #[must_use]
    pub fn programmed(&self) -> Programmed {
        Programmed {
            service_ports: self.applied.len(),
            frontends: self.owners.len(),
            endpoint_slots: self
                .applied
                .values()
                .flat_map(|port| port.sets.values())
                .map(|set| set.slots.len())
                .sum(),
        }
    }

    /// Brings the maps to `desired`, looking at every service port.
    pub fn reconcile(&mut self, desired: &Desired) -> Report {
        self.reconcile_changes(desired, &Changed::Everything)
    }

    /// Brings the maps to `desired`, looking only at the service ports in `changed` (and those
    /// whose last write failed): what the model says changed since the last pass.
    pub fn reconcile_changes(&mut self, desired: &Desired, changed: &Changed) -> Report {
        let mut report = Report::default();
        self.ids.thaw();
        let scope: Option<BTreeSet<ServicePortName>> = match changed {
            Changed::Everything => {
                self.repair_counts(&mut report);
                None
            }
            Changed::Ports(ports) => Some(ports.union(&self.retry).cloned().collect()),
        };
        self.release_frontends(desired, scope.as_ref(), &mut report);
        // Removed ports next: they free map space the additions may need.
        let gone: Vec<ServicePortName> = match &scope {
            None => self.applied.keys().cloned().collect(),
            Some(scope) => scope.iter().cloned().collect(),
        };
        for name in gone {
            if desired.ports.contains_key(&name) || !self.applied.contains_key(&name) {
                continue;
            }
            match self.remove_port(&name) {
                Ok(()) => report.removed.push(name),
                Err(error) => report.failed.push((name, error)),
            }
        }
        let looked_at: Vec<(&ServicePortName, &DesiredPort)> = match &scope {
            None => desired
                .ports
                .iter()
                .map(|(name, port)| (name, &**port))
                .collect(),
            Some(scope) => scope
                .iter()
                .filter_map(|name| desired.ports.get_key_value(name))
                .map(|(name, port)| (name, &**port))
                .collect(),
        };
        for (name, want) in looked_at {
            let outcome = match self.applied.get(name) {
                None => self
                    .add_port(name, want)
                    .map(|()| report.added.push(name.clone())),
                Some(have) if !matches(have, want) => self
                    .update_port(name, want)
                    .map(|()| report.updated.push(name.clone())),
                Some(_) => Ok(()),
            };
            if let Err(error) = outcome {
                report.failed.push((name.clone(), error));
            }
        }
        self.reconcile_overlay(desired, &mut report);
        self.reconcile_pod_namespaces(desired, &mut report);
        self.retry = report.failed.iter().map(|(name, _)| name.clone()).collect();
        report
    }

    /// Lowers any frontend count that exposes slots the map lacks (pins of an agent killed
    /// mid-write, or a slot map recreated under its frontends), so the invariant holds before
    /// anything else is attempted, whatever fails later.
    fn repair_counts(&mut self, report: &mut Report) {
        let Self { maps, applied, .. } = self;
        for (name, port) in applied.iter_mut() {
            let dense: BTreeMap<u32, u32> = port
                .sets
                .values()
                .map(|set| (set.id, set.dense()))
                .collect();
            let present = |id: u32| dense.get(&id).copied().unwrap_or(0);
            for (key, value) in &mut port.frontends {
                let repaired = ServiceValue {
                    count: value.count.min(present(value.id)),
                    cluster_count: value.cluster_count.min(present(value.cluster_id)),
                    ..*value
                };
                if repaired != *value {
                    match maps.set_frontend(*key, repaired) {
                        Ok(()) => *value = repaired,
                        Err(error) => report.failed.push((name.clone(), error)),
                    }
                }
            }
        }
    }

    /// Removes every frontend of the ports looked at that the desired state no longer gives
    /// them, before any port writes: a frontend moving between ports (both looked at, as the
    /// model reports both changed) is then never removed after its new owner wrote it.
    fn release_frontends(
        &mut self,
        desired: &Desired,
        scope: Option<&BTreeSet<ServicePortName>>,
        report: &mut Report,
    ) {
        let ports: Vec<&AppliedPort> = match scope {
            None => self.applied.values().collect(),
            Some(scope) => scope
                .iter()
                .filter_map(|name| self.applied.get(name))
                .collect(),
        };
        let releasing: Vec<(ServiceKey, ServicePortName)> = ports
            .into_iter()
            .flat_map(|port| port.frontends.keys())
            .filter_map(|key| self.owners.get_key_value(key))
            .filter(|(key, owner)| {
                desired
                    .ports
                    .get(*owner)
                    .is_none_or(|port| !port.frontends.contains_key(*key))
            })
            .map(|(key, owner)| (*key, owner.clone()))
            .collect();
        for (key, owner) in releasing {
            let Self {
                maps,
                applied,
                owners,
                ..
            } = self;
            let port = applied.get_mut(&owner).expect("owners are applied");
            let outcome = remove_frontend(maps, port, key);
            match outcome {
                Ok(()) => {
                    owners.remove(&key);
                }
                Err(error) => report.failed.push((owner, error)),
            }
        }
    }

    fn reconcile_overlay(&mut self, desired: &Desired, report: &mut Report) {
        let Self {
            maps,
            subnets,
            vteps,
            ..
        } = self;
        let mut record = |name: String, outcome: Result<(), MapWriteError>| match outcome {
            Ok(()) => report.node_changes += 1,
            Err(error) => report.node_failed.push((name, error)),
        };
        for (ip, vtep) in changed(vteps, &desired.vteps) {
            let outcome = maps.set_vtep(ip, vtep).map(|()| {
                vteps.insert(ip, vtep);
            });
            record(format!("member {ip}"), outcome);
        }
        for (subnet, node) in changed(subnets, &desired.subnets) {
            let outcome = maps.set_subnet(subnet, node).map(|()| {
                subnets.insert(subnet, node);
            });
            record(format!("subnet {subnet}"), outcome);
        }
        for subnet in gone(subnets, &desired.subnets) {
            let outcome = maps.remove_subnet(subnet).map(|()| {
                subnets.remove(&subnet);
            });
            record(format!("subnet {subnet}"), outcome);
        }
        for ip in gone(vteps, &desired.vteps) {
            let outcome = maps.remove_vtep(ip).map(|()| {
                vteps.remove(&ip);
            });
            record(format!("member {ip}"), outcome);
        }
    }

    fn reconcile_pod_namespaces(&mut self, desired: &Desired, report: &mut Report) {
        let Self {
            maps,
            pod_namespaces,
            ..
        } = self;
        let mut record = |name: String, outcome: Result<(), MapWriteError>| match outcome {
            Ok(()) => report.node_changes += 1,
            Err(error) => report.node_failed.push((name, error)),
        };
        for cookie in gone(pod_namespaces, &desired.pod_namespaces) {
            let outcome = maps.remove_pod_namespace(cookie).map(|()| {
                pod_namespaces.remove(&cookie);
            });
            record(format!("pod namespace {cookie}"), outcome);
        }
        for (cookie, pod) in changed(pod_namespaces, &desired.pod_namespaces) {
            let outcome = maps.set_pod_namespace(cookie, pod).map(|()| {
                pod_namespaces.insert(cookie, pod);
            });
            record(format!("pod namespace {cookie} ({pod})"), outcome);
        }
    }

    fn add_port(
        &mut self,
        name: &ServicePortName,
        want: &DesiredPort,
    ) -> Result<(), MapWriteError> {
        self.applied.insert(name.clone(), AppliedPort::default());
        self.update_port(name, want).inspect_err(|_| {
            // Take back what was written, frontends first, so nothing half-built stays visible.
            // If that fails too, the port stays applied and the next pass retries it.
            let _ = self.remove_port(name);
        })
    }

    fn update_port(
        &mut self,
        name: &ServicePortName,
        want: &DesiredPort,
    ) -> Result<(), MapWriteError> {
        let Self {
            maps,
            applied,
            owners,
            ids,
            ..
        } = self;
        let port = applied
            .get_mut(name)
            .expect("update_port is called for applied ports");
        let mut layouts: BTreeMap<Scope, Vec<EndpointValue>> = BTreeMap::new();
        for (scope, endpoints) in &want.sets {
            if !port.sets.contains_key(scope) {
                let id = ids.take();
                maps.set_name(id, encode_name(name, scope_to_wire(*scope)))
                    .inspect_err(|_| ids.release(id))?;
                port.sets.insert(
                    *scope,
                    AppliedSet {
                        id,
                        ..AppliedSet::default()
                    },
                );
            }
            let set = port.sets.get_mut(scope).expect("just ensured");
            layouts.insert(*scope, fill_set(maps, set, endpoints)?);
        }
        let count = |scope: Scope| layouts.get(&scope).map_or(0, |layout| layout.len() as u32);
        let id = |scope: Scope| port.sets.get(&scope).map_or(0, |set| set.id);
        let mut taken_over = Vec::new();
        for (key, spec) in &want.frontends {
            let value = frontend_value(spec, id, count);
            let ranges = want.source_ranges.get(key);
            let written = port.source_ranges.entry(*key).or_default();
            for range in ranges.into_iter().flatten() {
                if !written.contains(range) {
                    maps.set_source_range(*key, *range)?;
                    written.insert(*range);
                }
            }
            if port.frontends.get(key) != Some(&value) {
                maps.set_frontend(*key, value)?;
                port.frontends.insert(*key, value);
                // A frontend whose release failed belonged to another port until this write.
                if let Some(previous) = owners.insert(*key, name.clone())
                    && previous != *name
                {
                    taken_over.push((previous, *key));
                }
            }
            let stale: Vec<Ipv4Net> = written
                .iter()
                .filter(|range| !ranges.is_some_and(|want| want.contains(range)))
                .copied()
                .collect();
            for range in stale {
                maps.remove_source_range(*key, range)?;
                written.remove(&range);
            }
        }
        port.source_ranges.retain(|_, ranges| !ranges.is_empty());
        for (scope, layout) in &layouts {
            let set = port.sets.get_mut(scope).expect("filled above");
            trim_set(maps, set, layout.len())?;
        }
        let unused: Vec<Scope> = port
            .sets
            .keys()
            .filter(|scope| !want.sets.contains_key(scope))
            .copied()
            .collect();
        for scope in unused {
            let set = port.sets.get_mut(&scope).expect("listed above");
            remove_set(maps, set)?;
            ids.release(set.id);
            port.sets.remove(&scope);
        }
        for (previous, key) in taken_over {
            if let Some(port) = applied.get_mut(&previous) {
                port.frontends.remove(&key);
            }
        }
        Ok(())
    }

    fn remove_port(&mut self, name: &ServicePortName) -> Result<(), MapWriteError> {
        let Self {
            maps,
            applied,
            ids,
            owners,
            ..
        } = self;
        let port = applied
            .get_mut(name)
            .expect("remove_port is called for applied ports");
        while let Some((&key, _)) = port.frontends.first_key_value() {
            remove_frontend(maps, port, key)?;
            owners.remove(&key);
        }
        // Ranges left without a frontend (adopted strays).
        while let Some((&key, _)) = port.source_ranges.first_key_value() {
            remove_frontend(maps, port, key)?;
        }
        while let Some((&scope, _)) = port.sets.first_key_value() {
            let set = port.sets.get_mut(&scope).expect("just listed");
            remove_set(maps, set)?;
            ids.release(set.id);
            port.sets.remove(&scope);
        }
        applied.remove(name);
        Ok(())
    }
}

/// The value a frontend's spec calls for, given its port's set ids and slot counts by scope.
fn frontend_value(
    spec: &FrontendSpec,
    id: impl Fn(Scope) -> u32,
    count: impl Fn(Scope) -> u32,
) -> ServiceValue {
    let local_external = spec.policy.local_external;
    let cluster = Scope::Cluster;
    ServiceValue {
        id: id(spec.scope),
        count: count(spec.scope),
        cluster_id: if local_external { id(cluster) } else { 0 },
        cluster_count: if local_external { count(cluster) } else { 0 },
        affinity_timeout_s: spec.affinity_timeout_s,
        flags: policy_flags(spec.policy),
        _pad: 0,
    }
}

/// A set's scope as its name in the map records it ([`endpoint_scope`]).
const fn scope_to_wire(scope: Scope) -> u8 {
    match scope {
        Scope::Cluster => endpoint_scope::CLUSTER,
        Scope::NodeLocal => endpoint_scope::NODE_LOCAL,
    }
}

/// The scope a set's name in the map records, if this build knows it.
const fn scope_from_wire(scope: u8) -> Option<Scope> {
    match scope {
        endpoint_scope::CLUSTER => Some(Scope::Cluster),
        endpoint_scope::NODE_LOCAL => Some(Scope::NodeLocal),
        _ => None,
    }
}

/// A frontend's policy as the datapath reads it ([`service_flags`]).
fn policy_flags(policy: FrontendPolicy) -> u16 {
    let bit = |on: bool, flag: u16| if on { flag } else { 0 };
    bit(policy.masquerade_all, service_flags::MASQUERADE_ALL)
        | bit(policy.local_external, service_flags::LOCAL_EXTERNAL)
        | bit(policy.source_ranges, service_flags::SOURCE_RANGES)
        | bit(policy.reject, service_flags::REJECT)
}

/// Removes a frontend, then the source ranges it had.
fn remove_frontend<M: DatapathMaps>(
    maps: &mut M,
    port: &mut AppliedPort,
    key: ServiceKey,
) -> Result<(), MapWriteError> {
    if port.frontends.contains_key(&key) {
        maps.remove_frontend(key)?;
        port.frontends.remove(&key);
    }
    if let Some(ranges) = port.source_ranges.get_mut(&key) {
        while let Some(range) = ranges.first().copied() {
            maps.remove_source_range(key, range)?;
            ranges.remove(&range);
        }
        port.source_ranges.remove(&key);
    }
    Ok(())
}

/// Writes a set's slots and membership for `endpoints`, leaving slots past the new layout for
/// [`trim_set`] (after the frontends stop exposing them). Returns the layout.
fn fill_set<M: DatapathMaps>(
    maps: &mut M,
    set: &mut AppliedSet,
    endpoints: &BTreeSet<EndpointValue>,
) -> Result<Vec<EndpointValue>, MapWriteError> {
    let departing: Vec<EndpointValue> = set
        .members
        .keys()
        .filter(|e| !endpoints.contains(*e))
        .copied()
        .collect();
    for endpoint in departing {
        maps.remove_member(member_key(set.id, endpoint))?;
        set.members.remove(&endpoint);
    }
    let layout = plan_layout(&set.slots, endpoints);
    for (slot, endpoint) in layout.iter().enumerate() {
        if set.slots.get(slot).copied().flatten() != Some(*endpoint) {
            maps.set_endpoint(endpoint_key(set.id, slot), *endpoint)?;
            if slot < set.slots.len() {
                set.slots[slot] = Some(*endpoint);
            } else {
                set.slots.push(Some(*endpoint));
            }
        }
        let slot = slot as u32;
        if set.members.get(endpoint) != Some(&slot) {
            maps.set_member(member_key(set.id, *endpoint), slot)?;
            set.members.insert(*endpoint, slot);
        }
    }
    Ok(layout)
}

/// Deletes a set's slots past `len`, from the end.
fn trim_set<M: DatapathMaps>(
    maps: &mut M,
    set: &mut AppliedSet,
    len: usize,
) -> Result<(), MapWriteError> {
    while set.slots.len() > len {
        maps.remove_endpoint(endpoint_key(set.id, set.slots.len() - 1))?;
        set.slots.pop();
    }
    Ok(())
}

/// Deletes a set no frontend exposes any more: membership, slots, then its name.
fn remove_set<M: DatapathMaps>(maps: &mut M, set: &mut AppliedSet) -> Result<(), MapWriteError> {
    while let Some((&endpoint, _)) = set.members.first_key_value() {
        maps.remove_member(member_key(set.id, endpoint))?;
        set.members.remove(&endpoint);
    }
    trim_set(maps, set, 0)?;
    maps.remove_name(set.id)
}

/// Entries of `want` that `have` lacks or holds differently.
fn changed<K: Ord + Copy, V: PartialEq + Copy>(
    have: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
) -> Vec<(K, V)> {
    want.iter()
        .filter(|(key, value)| have.get(key) != Some(value))
        .map(|(key, value)| (*key, *value))
        .collect()
}

/// Keys of `have` that `want` no longer has.
fn gone<K: Ord + Copy, V>(have: &BTreeMap<K, V>, want: &BTreeMap<K, V>) -> Vec<K> {
    have.keys()
        .filter(|key| !want.contains_key(key))
        .copied()
        .collect()
}

/// A name for map entries found without a usable name; no desired port can have it, so the
/// first reconcile removes them.
fn stray_name(id: u32, why: &str) -> ServicePortName {
    ServicePortName {
        service: ObjectRef {
            namespace: String::new(),
            name: format!("<stray id {id}: {why}>"),
        },
        port: String::new(),
    }
}

fn endpoint_key(service_id: u32, slot: usize) -> EndpointKey {
    EndpointKey {
        service_id,
        slot: u32::try_from(slot).expect("slot counts fit the map's u32 index"),
    }
}

fn member_key(set_id: u32, endpoint: EndpointValue) -> EndpointMemberKey {
    EndpointMemberKey {
        set_id,
        addr: endpoint.addr,
        port: endpoint.port,
        _pad: 0,
    }
}

/// Whether the applied port already is the desired one: the same sets, each holding exactly
/// its endpoints, every desired frontend (and no other) written with the value it calls for,
/// and the same source ranges.
fn matches(have: &AppliedPort, want: &DesiredPort) -> bool {
    let sets_match = have.sets.len() == want.sets.len()
        && want
            .sets
            .iter()
            .all(|(scope, endpoints)| have.sets.get(scope).is_some_and(|set| set.holds(endpoints)));
    if !sets_match {
        return false;
    }
    let id = |scope: Scope| have.sets.get(&scope).map_or(0, |set| set.id);
    let count = |scope: Scope| {
        have.sets
            .get(&scope)
            .map_or(0, |set| set.slots.len() as u32)
    };
    have.frontends.len() == want.frontends.len()
        && want
            .frontends
            .iter()
            .all(|(key, spec)| have.frontends.get(key) == Some(&frontend_value(spec, id, count)))
        && have.source_ranges == want.source_ranges
}

/// The slot layout for `desired` that rewrites the fewest slots of `current`: endpoints that
/// stay keep their slot, new ones fill the holes the departed left, and what is left over is
/// compacted from the end, so slots stay dense from 0.
fn plan_layout(
    current: &[Option<EndpointValue>],
    desired: &BTreeSet<EndpointValue>,
) -> Vec<EndpointValue> {
    let mut seen = BTreeSet::new();
    let mut layout: Vec<Option<EndpointValue>> = current
        .iter()
        .map(|slot| slot.filter(|e| desired.contains(e) && seen.insert(*e)))
        .collect();
    let mut added = desired.iter().filter(|e| !seen.contains(*e)).copied();
    for slot in layout.iter_mut().filter(|slot| slot.is_none()) {
        match added.next() {
            Some(endpoint) => *slot = Some(endpoint),
            None => break,
        }
    }
    layout.extend(added.map(Some));
    let mut slot = 0;
    while slot < layout.len() {
        if layout[slot].is_some() {
            slot += 1;
        } else {
            // Fill the hole with the last entry (or drop it, when it is the last).
            layout.swap_remove(slot);
        }
    }
    layout.into_iter().flatten().collect()
}

#[cfg(test)]
pub(crate) mod tests;
