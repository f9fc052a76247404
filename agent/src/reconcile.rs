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
pub(crate) mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use weft_common::maps::ServiceName;

    use super::*;
    use crate::datapath::maps::MapsDump;

    /// One map operation, as the fake records it.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub(crate) enum Op {
        SetEndpoint(u32, u32),
        RemoveEndpoint(u32, u32),
        /// Set id and the endpoint's last octet.
        SetMember(u32, u8),
        RemoveMember(u32, u8),
        SetFrontend(u16, u32),
        RemoveFrontend(u16),
        SetName(u32),
        RemoveName(u32),
        /// Frontend port and range.
        SetRange(u16, Ipv4Net),
        RemoveRange(u16, Ipv4Net),
        SetSubnet(Ipv4Net),
        RemoveSubnet(Ipv4Net),
        SetVtep(Ipv4Addr),
        RemoveVtep(Ipv4Addr),
        SetPodNamespace(u64),
        RemovePodNamespace(u64),
    }

    /// The agent-written maps as plain collections, with a capacity like the real ones.
    #[derive(Default)]
    pub(crate) struct FakeMaps {
        pub(crate) frontends: BTreeMap<ServiceKey, ServiceValue>,
        pub(crate) endpoints: BTreeMap<EndpointKey, EndpointValue>,
        pub(crate) names: BTreeMap<u32, ServiceName>,
        pub(crate) members: BTreeMap<EndpointMemberKey, u32>,
        pub(crate) ranges: BTreeSet<(ServiceKey, Ipv4Net)>,
        pub(crate) subnets: BTreeMap<Ipv4Net, RemoteNode>,
        pub(crate) vteps: BTreeMap<Ipv4Addr, Vtep>,
        pub(crate) pod_namespaces: BTreeMap<u64, Ipv4Addr>,
        pub(crate) max_endpoints: Option<usize>,
        pub(crate) ops: Vec<Op>,
    }

    impl DatapathMaps for FakeMaps {
        fn set_endpoint(
            &mut self,
            key: EndpointKey,
            value: EndpointValue,
        ) -> Result<(), MapWriteError> {
            if self.max_endpoints.is_some_and(|max| {
                self.endpoints.len() >= max && !self.endpoints.contains_key(&key)
            }) {
                return Err(MapWriteError::Full {
                    map: "fake",
                    hint: "raise --max-endpoints",
                });
            }
            self.ops.push(Op::SetEndpoint(key.service_id, key.slot));
            self.endpoints.insert(key, value);
            Ok(())
        }

        fn remove_endpoint(&mut self, key: EndpointKey) -> Result<(), MapWriteError> {
            self.ops.push(Op::RemoveEndpoint(key.service_id, key.slot));
            self.endpoints.remove(&key);
            Ok(())
        }

        fn set_frontend(
            &mut self,
            key: ServiceKey,
            value: ServiceValue,
        ) -> Result<(), MapWriteError> {
            // The invariant the datapath relies on: every slot below a count exists.
            self.assert_exposed(&key, &value);
            self.ops.push(Op::SetFrontend(key.port, value.count));
            self.frontends.insert(key, value);
            Ok(())
        }

        fn remove_frontend(&mut self, key: ServiceKey) -> Result<(), MapWriteError> {
            self.ops.push(Op::RemoveFrontend(key.port));
            self.frontends.remove(&key);
            Ok(())
        }

        fn set_name(&mut self, id: u32, name: ServiceName) -> Result<(), MapWriteError> {
            self.ops.push(Op::SetName(id));
            self.names.insert(id, name);
            Ok(())
        }

        fn remove_name(&mut self, id: u32) -> Result<(), MapWriteError> {
            self.ops.push(Op::RemoveName(id));
            self.names.remove(&id);
            Ok(())
        }

        fn set_member(&mut self, key: EndpointMemberKey, slot: u32) -> Result<(), MapWriteError> {
            assert_eq!(
                self.endpoints.get(&EndpointKey {
                    service_id: key.set_id,
                    slot
                }),
                Some(&EndpointValue {
                    addr: key.addr,
                    port: key.port,
                    _pad: 0
                }),
                "a member is written after its slot"
            );
            self.ops.push(Op::SetMember(key.set_id, key.addr[3]));
            self.members.insert(key, slot);
            Ok(())
        }

        fn remove_member(&mut self, key: EndpointMemberKey) -> Result<(), MapWriteError> {
            self.ops.push(Op::RemoveMember(key.set_id, key.addr[3]));
            self.members.remove(&key);
            Ok(())
        }

        fn set_source_range(
            &mut self,
            frontend: ServiceKey,
            range: Ipv4Net,
        ) -> Result<(), MapWriteError> {
            self.ops.push(Op::SetRange(frontend.port, range));
            self.ranges.insert((frontend, range));
            Ok(())
        }

        fn remove_source_range(
            &mut self,
            frontend: ServiceKey,
            range: Ipv4Net,
        ) -> Result<(), MapWriteError> {
            self.ops.push(Op::RemoveRange(frontend.port, range));
            self.ranges.remove(&(frontend, range));
            Ok(())
        }

        fn set_subnet(&mut self, subnet: Ipv4Net, node: RemoteNode) -> Result<(), MapWriteError> {
            self.ops.push(Op::SetSubnet(subnet));
            self.subnets.insert(subnet, node);
            Ok(())
        }

        fn remove_subnet(&mut self, subnet: Ipv4Net) -> Result<(), MapWriteError> {
            self.ops.push(Op::RemoveSubnet(subnet));
            self.subnets.remove(&subnet);
            Ok(())
        }

        fn set_vtep(&mut self, public_ip: Ipv4Addr, vtep: Vtep) -> Result<(), MapWriteError> {
            self.ops.push(Op::SetVtep(public_ip));
            self.vteps.insert(public_ip, vtep);
            Ok(())
        }

        fn remove_vtep(&mut self, public_ip: Ipv4Addr) -> Result<(), MapWriteError> {
            self.ops.push(Op::RemoveVtep(public_ip));
            self.vteps.remove(&public_ip);
            Ok(())
        }

        fn set_pod_namespace(&mut self, cookie: u64, pod: Ipv4Addr) -> Result<(), MapWriteError> {
            self.ops.push(Op::SetPodNamespace(cookie));
            self.pod_namespaces.insert(cookie, pod);
            Ok(())
        }

        fn remove_pod_namespace(&mut self, cookie: u64) -> Result<(), MapWriteError> {
            self.ops.push(Op::RemovePodNamespace(cookie));
            self.pod_namespaces.remove(&cookie);
            Ok(())
        }

        fn dump(&self) -> Result<MapsDump, MapReadError> {
            Ok(MapsDump {
                frontends: self.frontends.iter().map(|(k, v)| (*k, *v)).collect(),
                endpoints: self.endpoints.iter().map(|(k, v)| (*k, *v)).collect(),
                names: self.names.iter().map(|(k, v)| (*k, *v)).collect(),
                members: self.members.iter().map(|(k, v)| (*k, *v)).collect(),
                source_ranges: self.ranges.iter().copied().collect(),
                subnets: self.subnets.iter().map(|(k, v)| (*k, *v)).collect(),
                vteps: self.vteps.iter().map(|(k, v)| (*k, *v)).collect(),
                pod_namespaces: self.pod_namespaces.iter().map(|(k, v)| (*k, *v)).collect(),
            })
        }
    }

    impl FakeMaps {
        fn assert_exposed(&self, key: &ServiceKey, value: &ServiceValue) {
            for (id, count) in [
                (value.id, value.count),
                (value.cluster_id, value.cluster_count),
            ] {
                for slot in 0..count {
                    assert!(
                        self.endpoints.contains_key(&EndpointKey {
                            service_id: id,
                            slot
                        }),
                        "frontend {key:?} exposes missing slot {slot} of set {id}"
                    );
                }
            }
        }

        /// Checks the invariants the datapath relies on after a pass: every slot below a
        /// frontend's counts exists, every set has a name, every member is in its slot, and a
        /// frontend that checks source ranges has them.
        fn assert_consistent(&self) {
            for (key, value) in &self.frontends {
                self.assert_exposed(key, value);
                assert!(self.names.contains_key(&value.id));
                if value.flags & service_flags::SOURCE_RANGES != 0 {
                    assert!(self.ranges.iter().any(|(frontend, _)| frontend == key));
                }
            }
            for (key, slot) in &self.members {
                assert_eq!(
                    self.endpoints[&EndpointKey {
                        service_id: key.set_id,
                        slot: *slot
                    }]
                        .addr,
                    key.addr
                );
            }
        }

        /// The endpoints a frontend spreads connections over.
        fn endpoints_of(&self, port: u16) -> BTreeSet<u8> {
            let (_, value) = self
                .frontends
                .iter()
                .find(|(k, _)| k.port == port)
                .expect("frontend exists");
            self.slots(value.id, value.count)
        }

        fn slots(&self, id: u32, count: u32) -> BTreeSet<u8> {
            (0..count)
                .map(|slot| {
                    self.endpoints[&EndpointKey {
                        service_id: id,
                        slot,
                    }]
                        .addr[3]
                })
                .collect()
        }
    }

    const CLUSTER: Scope = Scope::Cluster;
    const LOCAL: Scope = Scope::NodeLocal;

    fn endpoint(last: u8) -> EndpointValue {
        EndpointValue {
            addr: [172, 30, 20, last],
            port: 80,
            _pad: 0,
        }
    }

    fn frontend(port: u16) -> ServiceKey {
        ServiceKey {
            addr: [10, 254, 40, 119],
            port,
            proto: 6,
            _pad: 0,
        }
    }

    fn port_name(name: &str) -> ServicePortName {
        ServicePortName {
            service: ObjectRef {
                namespace: "default".into(),
                name: name.into(),
            },
            port: String::new(),
        }
    }

    fn cluster_port(port: u16, endpoints: &[u8]) -> DesiredPort {
        DesiredPort {
            sets: [(
                CLUSTER,
                endpoints.iter().map(|last| endpoint(*last)).collect(),
            )]
            .into(),
            frontends: [(port_key(port), FrontendSpec::default())].into(),
            source_ranges: BTreeMap::new(),
        }
    }

    fn port_key(port: u16) -> ServiceKey {
        frontend(port)
    }

    fn desired(ports: &[(&str, u16, &[u8])]) -> Desired {
        Desired {
            ports: ports
                .iter()
                .map(|(name, port, endpoints)| {
                    (port_name(name), Arc::new(cluster_port(*port, endpoints)))
                })
                .collect(),
            ..Desired::default()
        }
    }

    fn overlay(nodes: &[(&str, u8)]) -> Desired {
        let mut desired = Desired::default();
        for (subnet, last) in nodes {
            let public_ip = Ipv4Addr::new(192, 168, 50, *last);
            let subnet: Ipv4Net = subnet.parse().unwrap();
            desired.subnets.insert(
                subnet,
                RemoteNode {
                    public_ip: public_ip.octets(),
                    vtep_mac: [2, 0, 0, 0, 0, *last],
                    ..RemoteNode::default()
                },
            );
            desired.vteps.insert(
                public_ip,
                Vtep {
                    subnet_addr: subnet.network().octets(),
                    subnet_prefix_len: 24,
                    _pad: [0; 3],
                },
            );
        }
        desired
    }

    fn named_port(port: &str) -> ServicePortName {
        ServicePortName {
            service: ObjectRef {
                namespace: "default".into(),
                name: "svc".into(),
            },
            port: port.into(),
        }
    }

    fn two_ports(first: (&str, u16), second: (&str, u16)) -> Desired {
        let mut desired = Desired::default();
        for (port, number, last) in [(first.0, first.1, 6), (second.0, second.1, 7)] {
            desired
                .ports
                .insert(named_port(port), Arc::new(cluster_port(number, &[last])));
        }
        desired
    }

    /// nginx with a NodePort-like external frontend (port 30080) under `externalTrafficPolicy:
    /// Local`: `local` endpoints on this node, `cluster` everywhere.
    fn local_external(local: &[u8], cluster: &[u8]) -> Desired {
        let set = |lasts: &[u8]| lasts.iter().map(|l| endpoint(*l)).collect();
        let mut desired = Desired::default();
        desired.ports.insert(
            port_name("nginx"),
            Arc::new(DesiredPort {
                sets: [(CLUSTER, set(cluster)), (LOCAL, set(local))].into(),
                frontends: [
                    (frontend(4432), FrontendSpec::default()),
                    (
                        frontend(30080),
                        FrontendSpec {
                            scope: LOCAL,
                            policy: FrontendPolicy {
                                local_external: true,
                                ..FrontendPolicy::default()
                            },
                            affinity_timeout_s: 0,
                        },
                    ),
                ]
                .into(),
                source_ranges: BTreeMap::new(),
            }),
        );
        desired
    }

    #[test]
    fn the_model_types_become_the_wire_values_the_datapath_reads() {
        for scope in [Scope::Cluster, Scope::NodeLocal] {
            assert_eq!(scope_from_wire(scope_to_wire(scope)), Some(scope));
        }
        assert_eq!(scope_to_wire(Scope::NodeLocal), endpoint_scope::NODE_LOCAL);
        assert_eq!(scope_from_wire(7), None);
        let none = FrontendPolicy::default();
        assert_eq!(policy_flags(none), 0);
        for (policy, flag) in [
            (
                FrontendPolicy {
                    masquerade_all: true,
                    ..none
                },
                service_flags::MASQUERADE_ALL,
            ),
            (
                FrontendPolicy {
                    local_external: true,
                    ..none
                },
                service_flags::LOCAL_EXTERNAL,
            ),
            (
                FrontendPolicy {
                    source_ranges: true,
                    ..none
                },
                service_flags::SOURCE_RANGES,
            ),
            (
                FrontendPolicy {
                    reject: true,
                    ..none
                },
                service_flags::REJECT,
            ),
        ] {
            assert_eq!(policy_flags(policy), flag, "{policy:?}");
        }
    }

    #[test]
    fn a_set_named_with_an_unknown_scope_is_adopted_as_a_stray_and_removed() {
        let mut maps = FakeMaps::default();
        maps.names.insert(9, encode_name(&port_name("nginx"), 7));
        let mut reconciler = Reconciler::adopt(maps).unwrap();
        reconciler.reconcile(&desired(&[("nginx", 4432, &[6])]));
        reconciler.maps.assert_consistent();
        assert!(!reconciler.maps.names.contains_key(&9));
    }

    #[test]
    fn a_frontend_moving_to_another_port_of_the_service_stays_programmed() {
        let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
        let mut first = Desired::default();
        first
            .ports
            .insert(named_port("web"), Arc::new(cluster_port(80, &[6])));
        reconciler.reconcile(&first);
        // "http" (sorted before "web") takes port 80; "web" moves to 8080.
        let next = two_ports(("http", 80), ("web", 8080));
        reconciler.reconcile(&next);
        reconciler.maps.assert_consistent();
        assert_eq!(
            reconciler.maps.endpoints_of(80),
            [6].into(),
            "80 now leads to http's endpoint"
        );
        assert_eq!(reconciler.maps.endpoints_of(8080), [7].into());
        assert!(reconciler.reconcile(&next).is_empty(), "and stays that way");
    }

    fn value(id: u32, count: u32) -> ServiceValue {
        ServiceValue {
            id,
            count,
            ..ServiceValue::default()
        }
    }

    #[test]
    fn duplicated_slots_left_by_a_killed_agent_do_not_hide_a_missing_endpoint() {
        let mut maps = FakeMaps::default();
        maps.names
            .insert(1, encode_name(&port_name("nginx"), endpoint_scope::CLUSTER));
        for (slot, last) in [(0u32, 6u8), (1, 7), (2, 7)] {
            maps.endpoints.insert(
                EndpointKey {
                    service_id: 1,
                    slot,
                },
                endpoint(last),
            );
        }
        maps.frontends.insert(frontend(4432), value(1, 3));
        let mut reconciler = Reconciler::adopt(maps).unwrap();
        reconciler.reconcile(&desired(&[("nginx", 4432, &[6, 7, 8])]));
        assert_eq!(reconciler.maps.endpoints_of(4432), [6, 7, 8].into());
        reconciler.maps.assert_consistent();
    }

    #[test]
    fn an_adopted_count_beyond_the_slots_is_lowered_even_when_the_map_is_full() {
        let mut maps = FakeMaps {
            max_endpoints: Some(2),
            ..FakeMaps::default()
        };
        maps.names
            .insert(1, encode_name(&port_name("nginx"), endpoint_scope::CLUSTER));
        // The slot map was recreated empty under a frontend that still says 3.
        maps.frontends.insert(frontend(4432), value(1, 3));
        let mut reconciler = Reconciler::adopt(maps).unwrap();
        let report = reconciler.reconcile(&desired(&[("nginx", 4432, &[6, 7, 8])]));
        assert_eq!(
            report.failed.len(),
            1,
            "three endpoints do not fit two slots"
        );
        reconciler.maps.assert_consistent();
    }

    #[test]
    fn an_id_freed_in_a_pass_is_not_reused_in_the_same_pass() {
        let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
        reconciler.reconcile(&desired(&[("a", 1, &[1])]));
        reconciler.reconcile(&desired(&[("b", 2, &[2])]));
        assert_eq!(
            reconciler.maps.frontends[&frontend(2)].id,
            2,
            "id 1 was released in this pass"
        );
        reconciler.reconcile(&desired(&[("b", 2, &[2]), ("c", 3, &[3])]));
        assert_eq!(
            reconciler.maps.frontends[&frontend(3)].id,
            1,
            "and is reused in the next"
        );
    }

    #[test]
    fn members_come_before_their_subnets_and_go_after_them() {
        let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
        let report = reconciler.reconcile(&overlay(&[("172.30.44.0/24", 2)]));
        assert_eq!(report.node_changes, 2);
        let ip = Ipv4Addr::new(192, 168, 50, 2);
        let subnet: Ipv4Net = "172.30.44.0/24".parse().unwrap();
        assert_eq!(
            reconciler.maps.ops,
            vec![Op::SetVtep(ip), Op::SetSubnet(subnet)]
        );
        reconciler.maps.ops.clear();
        assert!(
            reconciler
                .reconcile(&overlay(&[("172.30.44.0/24", 2)]))
                .is_empty()
        );
        reconciler.reconcile(&overlay(&[]));
        assert_eq!(
            reconciler.maps.ops,
            vec![Op::RemoveSubnet(subnet), Op::RemoveVtep(ip)]
        );
        assert!(reconciler.maps.subnets.is_empty() && reconciler.maps.vteps.is_empty());
    }

    #[test]
    fn a_lease_that_moves_to_another_node_is_rewritten_in_place() {
        let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
        reconciler.reconcile(&overlay(&[("172.30.44.0/24", 2)]));
        reconciler.maps.ops.clear();
        reconciler.reconcile(&overlay(&[("172.30.44.0/24", 3)]));
        let subnet: Ipv4Net = "172.30.44.0/24".parse().unwrap();
        assert_eq!(
            reconciler.maps.ops,
            vec![
                Op::SetVtep(Ipv4Addr::new(192, 168, 50, 3)),
                Op::SetSubnet(subnet),
                Op::RemoveVtep(Ipv4Addr::new(192, 168, 50, 2))
            ]
        );
        assert_eq!(
            reconciler.maps.subnets[&subnet].public_ip,
            [192, 168, 50, 3]
        );
    }

    #[test]
    fn a_new_service_writes_name_then_slots_and_members_then_frontend() {
        let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
        let report = reconciler.reconcile(&desired(&[("nginx", 4432, &[6, 7, 8])]));
        assert_eq!(report.added, vec![port_name("nginx")]);
        assert_eq!(
            reconciler.maps.ops,
            vec![
                Op::SetName(1),
                Op::SetEndpoint(1, 0),
                Op::SetMember(1, 6),
                Op::SetEndpoint(1, 1),
                Op::SetMember(1, 7),
                Op::SetEndpoint(1, 2),
                Op::SetMember(1, 8),
                Op::SetFrontend(4432, 3)
            ]
        );
        reconciler.maps.assert_consistent();
        assert_eq!(reconciler.maps.endpoints_of(4432), [6, 7, 8].into());
    }

    #[test]
    fn an_unchanged_pass_writes_nothing() {
        let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
        let state = local_external(&[6], &[6, 7]);
        reconciler.reconcile(&state);
        reconciler.maps.ops.clear();
        assert!(reconciler.reconcile(&state).is_empty());
        assert!(reconciler.maps.ops.is_empty());
    }

    #[test]
    fn shrinking_drops_membership_first_and_lowers_the_count_before_deleting_slots() {
        let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
        reconciler.reconcile(&desired(&[("nginx", 4432, &[6, 7, 8])]));
        reconciler.maps.ops.clear();
        let report = reconciler.reconcile(&desired(&[("nginx", 4432, &[6, 8])]));
        assert_eq!(report.updated, vec![port_name("nginx")]);
        // .7 sat in slot 1: .8 moves there from the end, then the count drops, then slot 2 goes.
        assert_eq!(
            reconciler.maps.ops,
            vec![
                Op::RemoveMember(1, 7),
                Op::SetEndpoint(1, 1),
                Op::SetMember(1, 8),
                Op::SetFrontend(4432, 2),
                Op::RemoveEndpoint(1, 2)
            ]
        );
        reconciler.maps.assert_consistent();
        assert_eq!(reconciler.maps.endpoints_of(4432), [6, 8].into());
    }

    #[test]
    fn replacing_an_endpoint_rewrites_only_its_slot() {
        let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
        reconciler.reconcile(&desired(&[("nginx", 4432, &[6, 7, 8])]));
        reconciler.maps.ops.clear();
        reconciler.reconcile(&desired(&[("nginx", 4432, &[6, 8, 9])]));
        assert_eq!(
            reconciler.maps.ops,
            vec![
                Op::RemoveMember(1, 7),
                Op::SetEndpoint(1, 1),
                Op::SetMember(1, 9)
            ]
        );
        assert_eq!(reconciler.maps.endpoints_of(4432), [6, 8, 9].into());
    }

    #[test]
    fn growing_writes_slots_before_raising_the_count() {
        let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
        reconciler.reconcile(&desired(&[("nginx", 4432, &[6])]));
        reconciler.maps.ops.clear();
        reconciler.reconcile(&desired(&[("nginx", 4432, &[6, 7, 8])]));
        assert_eq!(
            reconciler.maps.ops,
            vec![
                Op::SetEndpoint(1, 1),
                Op::SetMember(1, 7),
                Op::SetEndpoint(1, 2),
                Op::SetMember(1, 8),
                Op::SetFrontend(4432, 3)
            ]
        );
    }

    #[test]
    fn removal_goes_frontends_members_slots_name_and_frees_the_id() {
        let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
        reconciler.reconcile(&desired(&[("nginx", 4432, &[6, 7])]));
        reconciler.maps.ops.clear();
        let report = reconciler.reconcile(&desired(&[]));
        assert_eq!(report.removed, vec![port_name("nginx")]);
        assert_eq!(
            reconciler.maps.ops,
            vec![
                Op::RemoveFrontend(4432),
                Op::RemoveMember(1, 6),
                Op::RemoveMember(1, 7),
                Op::RemoveEndpoint(1, 1),
                Op::RemoveEndpoint(1, 0),
                Op::RemoveName(1)
            ]
        );
        assert!(reconciler.maps.frontends.is_empty() && reconciler.maps.endpoints.is_empty());
        assert!(reconciler.maps.members.is_empty() && reconciler.maps.names.is_empty());
        reconciler.reconcile(&desired(&[("other", 80, &[9])]));
        assert_eq!(
            reconciler.maps.frontends[&frontend(80)].id,
            1,
            "id 1 is reused"
        );
    }

    #[test]
    fn no_endpoints_still_programs_the_frontend_with_count_zero() {
        let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
        reconciler.reconcile(&desired(&[("nginx", 4432, &[])]));
        assert_eq!(reconciler.maps.frontends[&frontend(4432)].count, 0);
    }

    #[test]
    fn a_full_map_fails_one_service_and_keeps_the_others() {
        let maps = FakeMaps {
            max_endpoints: Some(4),
            ..FakeMaps::default()
        };
        let mut reconciler = Reconciler::adopt(maps).unwrap();
        let report = reconciler.reconcile(&desired(&[
            ("a", 1, &[1, 2]),
            ("b", 2, &[3, 4, 5]),
            ("c", 3, &[6]),
        ]));
        assert_eq!(report.added, vec![port_name("a"), port_name("c")]);
        assert_eq!(report.failed.len(), 1);
        assert_eq!(report.failed[0].0, port_name("b"));
        assert!(matches!(report.failed[0].1, MapWriteError::Full { .. }));
        reconciler.maps.assert_consistent();
        assert!(
            !reconciler.maps.frontends.contains_key(&frontend(2)),
            "b is not half there"
        );
        assert_eq!(reconciler.maps.endpoints_of(1), [1, 2].into());
        assert_eq!(reconciler.maps.endpoints_of(3), [6].into());
        // Once space frees up, the next pass programs it.
        let report = reconciler.reconcile(&desired(&[("b", 2, &[3, 4, 5]), ("c", 3, &[6])]));
        assert_eq!(report.added, vec![port_name("b")]);
        assert_eq!(reconciler.maps.endpoints_of(2), [3, 4, 5].into());
    }

    #[test]
    fn pod_namespaces_follow_the_desired_state_and_survive_a_restart() {
        let pod = |last: u8| Ipv4Addr::new(172, 30, 20, last);
        let mut state = Desired {
            pod_namespaces: [(11, pod(2)), (12, pod(3))].into(),
            ..Desired::default()
        };
        let mut first = Reconciler::adopt(FakeMaps::default()).unwrap();
        assert_eq!(first.reconcile(&state).node_changes, 2);
        assert_eq!(first.maps.pod_namespaces, state.pod_namespaces);
        // A pod gone, one whose namespace got another address, a new one.
        state.pod_namespaces = [(12, pod(4)), (13, pod(5))].into();
        first.maps.ops.clear();
        first.reconcile(&state);
        assert_eq!(
            first.maps.ops,
            [
                Op::RemovePodNamespace(11),
                Op::SetPodNamespace(12),
                Op::SetPodNamespace(13)
            ]
        );
        assert_eq!(first.maps.pod_namespaces, state.pod_namespaces);
        let mut maps = first.maps;
        maps.ops.clear();
        let mut second = Reconciler::adopt(maps).unwrap();
        assert!(second.reconcile(&state).is_empty());
        assert!(second.maps.ops.is_empty());
    }

    #[test]
    fn a_restarted_agent_adopts_the_maps_and_rewrites_nothing() {
        let mut first = Reconciler::adopt(FakeMaps::default()).unwrap();
        let mut state = local_external(&[1], &[1, 2]);
        state.ports.extend(desired(&[("b", 2, &[3])]).ports);
        first.reconcile(&state);
        let mut maps = first.maps;
        maps.ops.clear();
        let mut second = Reconciler::adopt(maps).unwrap();
        assert!(second.reconcile(&state).is_empty());
        assert!(second.maps.ops.is_empty());
        // New ids do not collide with adopted ones.
        state.ports.extend(desired(&[("c", 3, &[4])]).ports);
        second.reconcile(&state);
        assert_eq!(second.maps.frontends[&frontend(3)].id, 4);
    }

    #[test]
    fn adopting_removes_entries_without_names_and_fills_slot_gaps() {
        let mut maps = FakeMaps::default();
        // id 7: a frontend and one slot, but no name (an agent killed mid-removal).
        maps.frontends.insert(frontend(9), value(7, 1));
        maps.endpoints.insert(
            EndpointKey {
                service_id: 7,
                slot: 0,
            },
            endpoint(1),
        );
        // id 2: named, slot 1 missing (killed mid-write).
        maps.names
            .insert(2, encode_name(&port_name("a"), endpoint_scope::CLUSTER));
        maps.endpoints.insert(
            EndpointKey {
                service_id: 2,
                slot: 0,
            },
            endpoint(1),
        );
        maps.endpoints.insert(
            EndpointKey {
                service_id: 2,
                slot: 2,
            },
            endpoint(3),
        );
        maps.frontends.insert(frontend(1), value(2, 1));
        let mut reconciler = Reconciler::adopt(maps).unwrap();
        let report = reconciler.reconcile(&desired(&[("a", 1, &[1, 2, 3])]));
        assert_eq!(report.updated, vec![port_name("a")]);
        assert_eq!(report.removed.len(), 1);
        reconciler.maps.assert_consistent();
        assert_eq!(reconciler.maps.endpoints_of(1), [1, 2, 3].into());
        assert!(!reconciler.maps.frontends.contains_key(&frontend(9)));
        assert!(!reconciler.maps.endpoints.keys().any(|k| k.service_id == 7));
    }

    #[test]
    fn a_local_external_frontend_names_both_sets() {
        let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
        reconciler.reconcile(&local_external(&[6], &[6, 7, 8]));
        reconciler.maps.assert_consistent();
        let node_port = reconciler.maps.frontends[&frontend(30080)];
        assert_eq!(
            reconciler.maps.slots(node_port.id, node_port.count),
            [6].into()
        );
        assert_eq!(
            reconciler
                .maps
                .slots(node_port.cluster_id, node_port.cluster_count),
            [6, 7, 8].into()
        );
        assert_eq!(node_port.flags, service_flags::LOCAL_EXTERNAL);
        assert_eq!(reconciler.maps.endpoints_of(4432), [6, 7, 8].into());
        assert_eq!(reconciler.programmed().endpoint_slots, 4);
    }

    #[test]
    fn a_set_no_frontend_uses_goes_after_the_frontends_stop_naming_it() {
        let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
        reconciler.reconcile(&local_external(&[6], &[6, 7]));
        let local_id = reconciler.maps.frontends[&frontend(30080)].id;
        reconciler.maps.ops.clear();
        // The policy goes back to Cluster: the NodePort uses the cluster set.
        let mut cluster = desired(&[("nginx", 4432, &[6, 7])]);
        let port = Arc::make_mut(cluster.ports.get_mut(&port_name("nginx")).unwrap());
        port.frontends.insert(
            frontend(30080),
            FrontendSpec {
                scope: CLUSTER,
                policy: FrontendPolicy {
                    masquerade_all: true,
                    ..FrontendPolicy::default()
                },
                affinity_timeout_s: 0,
            },
        );
        reconciler.reconcile(&cluster);
        reconciler.maps.assert_consistent();
        let ops = &reconciler.maps.ops;
        let rewritten = ops
            .iter()
            .position(|op| *op == Op::SetFrontend(30080, 2))
            .expect("the NodePort is rewritten");
        let name_gone = ops
            .iter()
            .position(|op| *op == Op::RemoveName(local_id))
            .expect("the local set is removed");
        assert!(rewritten < name_gone, "{ops:?}");
        assert!(!reconciler.maps.names.contains_key(&local_id));
    }

    #[test]
    fn source_ranges_are_written_before_their_frontend_and_removed_after() {
        let mut reconciler = Reconciler::adopt(FakeMaps::default()).unwrap();
        let range: Ipv4Net = "198.51.100.0/24".parse().unwrap();
        let mut state = desired(&[("nginx", 4432, &[6])]);
        let port = Arc::make_mut(state.ports.get_mut(&port_name("nginx")).unwrap());
        port.frontends.insert(
            frontend(443),
            FrontendSpec {
                scope: CLUSTER,
                policy: FrontendPolicy {
                    masquerade_all: true,
                    source_ranges: true,
                    ..FrontendPolicy::default()
                },
                affinity_timeout_s: 30,
            },
        );
        port.source_ranges.insert(frontend(443), [range].into());
        reconciler.reconcile(&state);
        reconciler.maps.assert_consistent();
        let ops = &reconciler.maps.ops;
        let range_at = ops.iter().position(|op| *op == Op::SetRange(443, range));
        let frontend_at = ops.iter().position(|op| *op == Op::SetFrontend(443, 1));
        assert!(range_at < frontend_at, "{ops:?}");
        assert_eq!(
            reconciler.maps.frontends[&frontend(443)].affinity_timeout_s,
            30
        );
        reconciler.maps.ops.clear();
        reconciler.reconcile(&desired(&[("nginx", 4432, &[6])]));
        assert_eq!(
            reconciler.maps.ops,
            vec![Op::RemoveFrontend(443), Op::RemoveRange(443, range)]
        );
        assert!(reconciler.maps.ranges.is_empty());
    }

    /// The maps' content, ids aside: what each frontend leads to.
    fn served(maps: &FakeMaps) -> BTreeMap<ServiceKey, (Vec<u8>, Vec<u8>, u16)> {
        maps.frontends
            .iter()
            .map(|(key, value)| {
                let set = |id: u32, count: u32| maps.slots(id, count).into_iter().collect();
                (
                    *key,
                    (
                        set(value.id, value.count),
                        set(value.cluster_id, value.cluster_count),
                        value.flags,
                    ),
                )
            })
            .collect()
    }

    #[test]
    fn passes_over_what_changed_reach_what_full_passes_reach() {
        use crate::{
            model::Model,
            sources::objects::{ServicePort, ServiceSpec, SliceEndpoint, SlicePort, SliceSpec},
        };
        let name = |i: u32| ObjectRef {
            namespace: "default".into(),
            name: format!("svc-{i}"),
        };
        let mut model = Model::default();
        let mut incremental = Reconciler::adopt(FakeMaps::default()).unwrap();
        let mut full = Reconciler::adopt(FakeMaps::default()).unwrap();
        // A fixed pseudo-random walk over services, slices, shared frontends and node facts.
        let mut seed = 0x2545_f491_u32;
        let mut next = |n: u32| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed % n
        };
        for step in 0..400 {
            let i = next(12);
            match next(5) {
                0 | 1 => {
                    // Services 0..12 share four ClusterIPs, so frontends are contested.
                    let spec = ServiceSpec {
                        cluster_ip: Ipv4Addr::new(10, 254, 0, (i % 4) as u8 + 1),
                        ports: vec![ServicePort {
                            name: String::new(),
                            port: 80 + next(2) as u16,
                            protocol: 6,
                            node_port: (next(2) == 0).then_some(30_000 + i as u16),
                        }],
                        external_local: next(2) == 0,
                        ..ServiceSpec::default()
                    };
                    model.set_service(name(i), spec);
                }
                2 => {
                    model.remove_service(&name(i));
                }
                3 => {
                    let endpoints = (0..next(4))
                        .map(|e| SliceEndpoint {
                            addr: Ipv4Addr::new(172, 30, 20, (e + next(3)) as u8 + 2),
                            node_name: Some(if next(2) == 0 { "a" } else { "b" }.into()),
                            ..SliceEndpoint::default()
                        })
                        .collect();
                    model.set_slice(
                        ObjectRef {
                            namespace: "default".into(),
                            name: format!("slice-{}", next(20)),
                        },
                        SliceSpec {
                            service: name(i),
                            ports: vec![SlicePort {
                                name: String::new(),
                                port: 8080,
                                protocol: 6,
                            }],
                            endpoints,
                        },
                    );
                }
                _ => {
                    model.update_node(|node| {
                        node.name = Some("a".into());
                        node.node_port_addresses =
                            [Ipv4Addr::new(192, 168, 50, next(2) as u8 + 1)].into();
                    });
                }
            }
            let (desired, changed) = model.take_changes();
            incremental.reconcile_changes(&desired, &changed);
            full.reconcile(&desired);
            incremental.maps.assert_consistent();
            assert_eq!(
                served(&incremental.maps),
                served(&full.maps),
                "after step {step}"
            );
        }
    }

    #[test]
    fn layout_keeps_stayers_fills_holes_and_compacts() {
        let e = |last: u8| Some(endpoint(last));
        let want = |lasts: &[u8]| lasts.iter().map(|l| endpoint(*l)).collect::<BTreeSet<_>>();
        let lasts =
            |layout: Vec<EndpointValue>| layout.iter().map(|e| e.addr[3]).collect::<Vec<_>>();
        assert_eq!(
            lasts(plan_layout(&[e(1), e(2), e(3)], &want(&[1, 3, 4]))),
            vec![1, 4, 3]
        );
        assert_eq!(
            lasts(plan_layout(&[e(1), e(2), e(3)], &want(&[1, 3]))),
            vec![1, 3]
        );
        assert_eq!(
            lasts(plan_layout(&[e(1), e(2), e(3)], &want(&[3]))),
            vec![3]
        );
        assert_eq!(
            lasts(plan_layout(&[e(1), None, e(3)], &want(&[1, 3]))),
            vec![1, 3]
        );
        assert_eq!(lasts(plan_layout(&[e(2), e(2)], &want(&[2]))), vec![2]);
        assert_eq!(lasts(plan_layout(&[], &want(&[5, 6]))), vec![5, 6]);
        assert!(plan_layout(&[e(1)], &want(&[])).is_empty());
    }
}
