//! The agent-written maps as plain collections, for tests: what the reconciler writes through
//! in place of the kernel's maps, with the datapath's invariants checked on every write.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use weft_common::maps::{
    EndpointKey, EndpointMemberKey, EndpointValue, RemoteNode, ServiceKey, ServiceName,
    ServiceValue, Vtep, service_flags,
};

use super::{DatapathMaps, MapReadError, MapWriteError, MapsDump};

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
        if self
            .max_endpoints
            .is_some_and(|max| self.endpoints.len() >= max && !self.endpoints.contains_key(&key))
        {
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

    fn set_frontend(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapWriteError> {
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
    pub(crate) fn assert_consistent(&self) {
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
    pub(crate) fn endpoints_of(&self, port: u16) -> BTreeSet<u8> {
        let (_, value) = self
            .frontends
            .iter()
            .find(|(k, _)| k.port == port)
            .expect("frontend exists");
        self.slots(value.id, value.count)
    }

    pub(crate) fn slots(&self, id: u32, count: u32) -> BTreeSet<u8> {
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
