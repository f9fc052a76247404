//! The agent's side of the maps: typed handles on them, taken from a loaded object or opened
//! from an agent's pins ([`MapSource`], by the definitions in `weft_common::maps`), and the
//! maps it writes (services and overlay) behind one trait the reconciler writes through,
//! implemented over aya's maps (here) and over plain collections in tests.

use std::{
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::maps::{
    Array, HashMap, Map, MapData, MapError, PerCpuArray,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::Ipv4Net;
use weft_common::{
    drop_reason::DropReason,
    maps::{
        DROPS_MAP, ENDPOINT_MEMBERS_MAP, ENDPOINTS_MAP, EndpointKey, EndpointMemberKey,
        EndpointValue, MapDef, NAME_LEN, NAMESPACE_LEN, POD_NAMESPACES_MAP, PORT_NAME_LEN,
        RemoteNode, SERVICE_NAMES_MAP, SERVICES_MAP, SOURCE_RANGE_FRONTEND_BITS, SOURCE_RANGES_MAP,
        SUBNETS_MAP, ServiceKey, ServiceName, ServiceValue, SourceRangeKey, VTEPS_MAP, Vtep,
    },
};

use crate::{model::ServicePortName, sources::objects::ObjectRef};

#[cfg(test)]
pub(crate) mod fake;

/// A map that could not be had with its definition's types.
#[derive(Debug, thiserror::Error)]
pub enum MapOpenError {
    #[error("reading the map {name} pinned in {} (is `weft agent` using that --pin-dir?)", dir.display())]
    Pinned {
        name: &'static str,
        dir: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("the eBPF object has no map {name} (or it was taken already)")]
    NotInObject { name: &'static str },
    #[error("map {name} does not have this build's layout")]
    Layout {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

/// Where maps are had from: a loaded object (each taken once) or a running agent's pins. The
/// typed handles come from the definitions in `weft_common::maps`, so a map is always opened
/// with its own key and value types (aya checks their sizes against the kernel's).
pub trait MapSource {
    /// The map called `name`, untyped.
    fn open(&mut self, name: &'static str) -> Result<Map, MapOpenError>;

    fn hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        def: MapDef<K, V>,
    ) -> Result<HashMap<MapData, K, V>, MapOpenError> {
        typed(self.open(def.name())?, def.name())
    }

    fn lpm_trie<K: aya::Pod, V: aya::Pod>(
        &mut self,
        def: MapDef<K, V>,
    ) -> Result<LpmTrie<MapData, K, V>, MapOpenError> {
        typed(self.open(def.name())?, def.name())
    }

    fn array<V: aya::Pod>(
        &mut self,
        def: MapDef<u32, V>,
    ) -> Result<Array<MapData, V>, MapOpenError> {
        typed(self.open(def.name())?, def.name())
    }

    fn per_cpu_array<V: aya::Pod>(
        &mut self,
        def: MapDef<u32, V>,
    ) -> Result<PerCpuArray<MapData, V>, MapOpenError> {
        typed(self.open(def.name())?, def.name())
    }
}

fn typed<T: TryFrom<Map, Error = MapError>>(
    map: Map,
    name: &'static str,
) -> Result<T, MapOpenError> {
    T::try_from(map).map_err(|source| MapOpenError::Layout { name, source })
}

impl MapSource for aya::Ebpf {
    fn open(&mut self, name: &'static str) -> Result<Map, MapOpenError> {
        self.take_map(name)
            .ok_or(MapOpenError::NotInObject { name })
    }
}

/// The maps a running agent pinned in its pin directory: what `weft inspect`, `weft trace`,
/// `/metrics` and the tests read.
#[derive(Clone, Debug)]
pub struct PinnedMaps {
    dir: PathBuf,
}

impl PinnedMaps {
    #[must_use]
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    /// Every drop reason's count, summed over the CPUs.
    pub fn drop_counts(&mut self) -> Result<Vec<(DropReason, u64)>, MapOpenError> {
        let map = self.per_cpu_array(DROPS_MAP)?;
        DropReason::ALL
            .iter()
            .map(|reason| Ok((*reason, map.get(&(*reason as u32), 0)?.iter().sum())))
            .collect::<Result<_, MapError>>()
            .map_err(|source| MapOpenError::Pinned {
                name: DROPS_MAP.name(),
                dir: self.dir.clone(),
                source,
            })
    }
}

impl MapSource for PinnedMaps {
    fn open(&mut self, name: &'static str) -> Result<Map, MapOpenError> {
        let opened = MapData::from_pin(self.dir.join(name)).and_then(Map::from_map_data);
        opened.map_err(|source| MapOpenError::Pinned {
            name,
            dir: self.dir.clone(),
            source,
        })
    }
}

/// A failed map update or delete.
#[derive(Debug, thiserror::Error)]
pub enum MapWriteError {
    #[error("map {map} is full; {hint}")]
    Full {
        map: &'static str,
        hint: &'static str,
    },
    #[error("{op} on map {map} failed")]
    Syscall {
        map: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
}

/// A failed read of a whole map.
#[derive(Debug, thiserror::Error)]
#[error("reading map {map} failed")]
pub struct MapReadError {
    pub map: &'static str,
    #[source]
    pub source: MapError,
}

/// Everything in the agent-written maps, as read back (on restart, or by `weft inspect`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapsDump {
    pub frontends: Vec<(ServiceKey, ServiceValue)>,
    pub endpoints: Vec<(EndpointKey, EndpointValue)>,
    pub names: Vec<(u32, ServiceName)>,
    pub members: Vec<(EndpointMemberKey, u32)>,
    pub source_ranges: Vec<(ServiceKey, Ipv4Net)>,
    pub subnets: Vec<(Ipv4Net, RemoteNode)>,
    pub vteps: Vec<(Ipv4Addr, Vtep)>,
    /// This node's pods by network namespace cookie.
    pub pod_namespaces: Vec<(u64, Ipv4Addr)>,
}

/// Writes to the agent-written maps. Each call is one idempotent map operation; deleting an
/// absent key succeeds.
pub trait DatapathMaps {
    fn set_endpoint(&mut self, key: EndpointKey, value: EndpointValue)
    -> Result<(), MapWriteError>;
    fn remove_endpoint(&mut self, key: EndpointKey) -> Result<(), MapWriteError>;
    fn set_frontend(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapWriteError>;
    fn remove_frontend(&mut self, key: ServiceKey) -> Result<(), MapWriteError>;
    fn set_name(&mut self, id: u32, name: ServiceName) -> Result<(), MapWriteError>;
    fn remove_name(&mut self, id: u32) -> Result<(), MapWriteError>;
    fn set_member(&mut self, key: EndpointMemberKey, slot: u32) -> Result<(), MapWriteError>;
    fn remove_member(&mut self, key: EndpointMemberKey) -> Result<(), MapWriteError>;
    fn set_source_range(
        &mut self,
        frontend: ServiceKey,
        range: Ipv4Net,
    ) -> Result<(), MapWriteError>;
    fn remove_source_range(
        &mut self,
        frontend: ServiceKey,
        range: Ipv4Net,
    ) -> Result<(), MapWriteError>;
    fn set_subnet(&mut self, subnet: Ipv4Net, node: RemoteNode) -> Result<(), MapWriteError>;
    fn remove_subnet(&mut self, subnet: Ipv4Net) -> Result<(), MapWriteError>;
    fn set_vtep(&mut self, public_ip: Ipv4Addr, vtep: Vtep) -> Result<(), MapWriteError>;
    fn remove_vtep(&mut self, public_ip: Ipv4Addr) -> Result<(), MapWriteError>;
    fn set_pod_namespace(&mut self, cookie: u64, pod: Ipv4Addr) -> Result<(), MapWriteError>;
    fn remove_pod_namespace(&mut self, cookie: u64) -> Result<(), MapWriteError>;
    fn dump(&self) -> Result<MapsDump, MapReadError>;
}

/// The agent-written maps of a loaded or pinned dataplane.
pub struct AyaMaps {
    frontends: HashMap<MapData, ServiceKey, ServiceValue>,
    endpoints: HashMap<MapData, EndpointKey, EndpointValue>,
    names: HashMap<MapData, u32, ServiceName>,
    members: HashMap<MapData, EndpointMemberKey, u32>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    subnets: LpmTrie<MapData, [u8; 4], RemoteNode>,
    vteps: HashMap<MapData, [u8; 4], Vtep>,
    pod_namespaces: HashMap<MapData, u64, [u8; 4]>,
}

impl AyaMaps {
    /// Takes the maps out of a loaded object, or opens an agent's pins.
    pub fn open(source: &mut impl MapSource) -> Result<Self, MapOpenError> {
        Ok(Self {
            frontends: source.hash(SERVICES_MAP)?,
            endpoints: source.hash(ENDPOINTS_MAP)?,
            names: source.hash(SERVICE_NAMES_MAP)?,
            members: source.hash(ENDPOINT_MEMBERS_MAP)?,
            source_ranges: source.lpm_trie(SOURCE_RANGES_MAP)?,
            subnets: source.lpm_trie(SUBNETS_MAP)?,
            vteps: source.hash(VTEPS_MAP)?,
            pod_namespaces: source.hash(POD_NAMESPACES_MAP)?,
        })
    }
}

fn subnet_key(subnet: Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(subnet.prefix_len()), subnet.network().octets())
}

fn source_range_key(frontend: ServiceKey, range: Ipv4Net) -> Key<SourceRangeKey> {
    Key::new(
        SOURCE_RANGE_FRONTEND_BITS + u32::from(range.prefix_len()),
        SourceRangeKey {
            frontend,
            source: range.network().octets(),
        },
    )
}

const NODES_HINT: &str = "weft serves up to 16384 nodes";
const PODS_HINT: &str = "weft serves up to 65536 pods per node";
const RANGES_HINT: &str =
    "weft holds up to 16384 loadBalancerSourceRanges entries over all load balancers";

/// Creates `dir` (and its parents) for pins, root-only, and makes an existing one root-only:
/// whoever can open a pin can rewrite the node's dataplane.
pub(crate) fn create_pin_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Removes the pin at `path`; an absent one is fine.
pub fn remove_pin(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The names of the pins in `dir` (none when it does not exist).
pub(crate) fn pin_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect()
}

/// Removes every pin in `dir`, then `dir`; returns the names removed. No `dir` is no error.
pub fn remove_pin_dir(dir: &Path) -> io::Result<Vec<String>> {
    let names = pin_names(dir);
    for name in &names {
        remove_pin(&dir.join(name))?;
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(names),
    }
}

/// The errno of a failed map syscall, if that is what failed.
pub(crate) fn errno(error: &MapError) -> Option<i32> {
    match error {
        MapError::SyscallError(e) => e.io_error.raw_os_error(),
        MapError::IoError(e) => e.raw_os_error(),
        _ => None,
    }
}

fn write_result(
    result: Result<(), MapError>,
    map: &'static str,
    op: &'static str,
    hint: &'static str,
) -> Result<(), MapWriteError> {
    match result {
        Ok(()) => Ok(()),
        // A hash map at max_entries refuses new keys with E2BIG.
        Err(e) if errno(&e) == Some(libc::E2BIG) => Err(MapWriteError::Full { map, hint }),
        Err(e) if op == "delete" && errno(&e) == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(MapWriteError::Syscall { map, op, source }),
    }
}

/// Every entry a map iteration yields, or the first error.
fn read_all<T>(
    entries: impl Iterator<Item = Result<T, MapError>>,
    name: &'static str,
) -> Result<Vec<T>, MapReadError> {
    entries
        .collect::<Result<_, _>>()
        .map_err(|source| MapReadError { map: name, source })
}

impl DatapathMaps for AyaMaps {
    fn set_endpoint(
        &mut self,
        key: EndpointKey,
        value: EndpointValue,
    ) -> Result<(), MapWriteError> {
        write_result(
            self.endpoints.insert(key, value, 0),
            ENDPOINTS_MAP.name(),
            "update",
            "raise --max-endpoints",
        )
    }

    fn remove_endpoint(&mut self, key: EndpointKey) -> Result<(), MapWriteError> {
        write_result(
            self.endpoints.remove(&key),
            ENDPOINTS_MAP.name(),
            "delete",
            "raise --max-endpoints",
        )
    }

    fn set_frontend(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapWriteError> {
        write_result(
            self.frontends.insert(key, value, 0),
            SERVICES_MAP.name(),
            "update",
            "raise --max-services",
        )
    }

    fn remove_frontend(&mut self, key: ServiceKey) -> Result<(), MapWriteError> {
        write_result(
            self.frontends.remove(&key),
            SERVICES_MAP.name(),
            "delete",
            "raise --max-services",
        )
    }

    fn set_name(&mut self, id: u32, name: ServiceName) -> Result<(), MapWriteError> {
        write_result(
            self.names.insert(id, name, 0),
            SERVICE_NAMES_MAP.name(),
            "update",
            "raise --max-services",
        )
    }

    fn remove_name(&mut self, id: u32) -> Result<(), MapWriteError> {
        write_result(
            self.names.remove(&id),
            SERVICE_NAMES_MAP.name(),
            "delete",
            "raise --max-services",
        )
    }

    fn set_member(&mut self, key: EndpointMemberKey, slot: u32) -> Result<(), MapWriteError> {
        write_result(
            self.members.insert(key, slot, 0),
            ENDPOINT_MEMBERS_MAP.name(),
            "update",
            "raise --max-endpoints",
        )
    }

    fn remove_member(&mut self, key: EndpointMemberKey) -> Result<(), MapWriteError> {
        write_result(
            self.members.remove(&key),
            ENDPOINT_MEMBERS_MAP.name(),
            "delete",
            "raise --max-endpoints",
        )
    }

    fn set_source_range(
        &mut self,
        frontend: ServiceKey,
        range: Ipv4Net,
    ) -> Result<(), MapWriteError> {
        write_result(
            self.source_ranges
                .insert(&source_range_key(frontend, range), 1, 0),
            SOURCE_RANGES_MAP.name(),
            "update",
            RANGES_HINT,
        )
    }

    fn remove_source_range(
        &mut self,
        frontend: ServiceKey,
        range: Ipv4Net,
    ) -> Result<(), MapWriteError> {
        write_result(
            self.source_ranges
                .remove(&source_range_key(frontend, range)),
            SOURCE_RANGES_MAP.name(),
            "delete",
            RANGES_HINT,
        )
    }

    fn set_subnet(&mut self, subnet: Ipv4Net, node: RemoteNode) -> Result<(), MapWriteError> {
        write_result(
            self.subnets.insert(&subnet_key(subnet), node, 0),
            SUBNETS_MAP.name(),
            "update",
            NODES_HINT,
        )
    }

    fn remove_subnet(&mut self, subnet: Ipv4Net) -> Result<(), MapWriteError> {
        write_result(
            self.subnets.remove(&subnet_key(subnet)),
            SUBNETS_MAP.name(),
            "delete",
            NODES_HINT,
        )
    }

    fn set_vtep(&mut self, public_ip: Ipv4Addr, vtep: Vtep) -> Result<(), MapWriteError> {
        write_result(
            self.vteps.insert(public_ip.octets(), vtep, 0),
            VTEPS_MAP.name(),
            "update",
            NODES_HINT,
        )
    }

    fn remove_vtep(&mut self, public_ip: Ipv4Addr) -> Result<(), MapWriteError> {
        write_result(
            self.vteps.remove(&public_ip.octets()),
            VTEPS_MAP.name(),
            "delete",
            NODES_HINT,
        )
    }

    fn set_pod_namespace(&mut self, cookie: u64, pod: Ipv4Addr) -> Result<(), MapWriteError> {
        write_result(
            self.pod_namespaces.insert(cookie, pod.octets(), 0),
            POD_NAMESPACES_MAP.name(),
            "update",
            PODS_HINT,
        )
    }

    fn remove_pod_namespace(&mut self, cookie: u64) -> Result<(), MapWriteError> {
        write_result(
            self.pod_namespaces.remove(&cookie),
            POD_NAMESPACES_MAP.name(),
            "delete",
            PODS_HINT,
        )
    }

    fn dump(&self) -> Result<MapsDump, MapReadError> {
        let subnets = read_all(self.subnets.iter(), SUBNETS_MAP.name())?
            .into_iter()
            .filter_map(|(key, node)| {
                let len = u8::try_from(key.prefix_len()).ok()?;
                Some((Ipv4Net::new(Ipv4Addr::from(key.data()), len).ok()?, node))
            })
            .collect();
        let source_ranges = read_all(self.source_ranges.iter(), SOURCE_RANGES_MAP.name())?
            .into_iter()
            .filter_map(|(key, _)| {
                let len = key.prefix_len().checked_sub(SOURCE_RANGE_FRONTEND_BITS)?;
                let data = key.data();
                let range = Ipv4Net::new(Ipv4Addr::from(data.source), u8::try_from(len).ok()?);
                Some((data.frontend, range.ok()?))
            })
            .collect();
        Ok(MapsDump {
            frontends: read_all(self.frontends.iter(), SERVICES_MAP.name())?,
            endpoints: read_all(self.endpoints.iter(), ENDPOINTS_MAP.name())?,
            names: read_all(self.names.iter(), SERVICE_NAMES_MAP.name())?,
            members: read_all(self.members.iter(), ENDPOINT_MEMBERS_MAP.name())?,
            source_ranges,
            subnets,
            vteps: read_all(self.vteps.iter(), VTEPS_MAP.name())?
                .into_iter()
                .map(|(ip, vtep)| (Ipv4Addr::from(ip), vtep))
                .collect(),
            pod_namespaces: read_all(self.pod_namespaces.iter(), POD_NAMESPACES_MAP.name())?
                .into_iter()
                .map(|(cookie, pod)| (cookie, Ipv4Addr::from(pod)))
                .collect(),
        })
    }
}

fn pack<const N: usize>(text: &str) -> [u8; N] {
    let mut out = [0u8; N];
    // Kubernetes names are ASCII and within these lengths; anything longer is cut, not refused,
    // because the name is only for display.
    let len = text.len().min(N);
    out[..len].copy_from_slice(&text.as_bytes()[..len]);
    out
}

fn unpack(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The map form of the name of a service port's endpoint set of `scope`.
#[must_use]
pub fn encode_name(name: &ServicePortName, scope: u8) -> ServiceName {
    ServiceName {
        namespace: pack::<NAMESPACE_LEN>(&name.service.namespace),
        name: pack::<NAME_LEN>(&name.service.name),
        port_name: pack::<PORT_NAME_LEN>(&name.port),
        scope,
        _pad: [0; 3],
    }
}

/// A set's service port name and scope, read back from the map.
#[must_use]
pub fn decode_name(name: &ServiceName) -> (ServicePortName, u8) {
    let port = ServicePortName {
        service: ObjectRef {
            namespace: unpack(&name.namespace),
            name: unpack(&name.name),
        },
        port: unpack(&name.port_name),
    };
    (port, name.scope)
}

/// Whether an I/O error means "no such pinned map".
#[must_use]
pub fn is_not_found(error: &MapError) -> bool {
    errno(error) == Some(libc::ENOENT)
        || matches!(error, MapError::SyscallError(e) if e.io_error.kind() == io::ErrorKind::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_the_map_form() {
        let name = ServicePortName {
            service: ObjectRef {
                namespace: "kube-system".into(),
                name: "kube-dns".into(),
            },
            port: "dns-tcp".into(),
        };
        assert_eq!(decode_name(&encode_name(&name, 1)), (name, 1));
    }

    #[test]
    fn overlong_names_are_cut_not_refused() {
        let name = ServicePortName {
            service: ObjectRef {
                namespace: "n".repeat(100),
                name: "s".into(),
            },
            port: String::new(),
        };
        assert_eq!(
            decode_name(&encode_name(&name, 0))
                .0
                .service
                .namespace
                .len(),
            NAMESPACE_LEN
        );
    }
}
