//! Loading weft's eBPF object: checking and reusing its pinned maps, loading every program
//! through the verifier, and attaching them to the node.

use std::{
    collections::BTreeMap,
    fs, io,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use crate::datapath::links::{LinkPinError, LinkPins, pin_name};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapError, MapInfo},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType, Xdp,
        links::FdLink,
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle, qdisc_add_clsact},
        xdp::XdpMode,
    },
    util::KernelVersion,
};
use weft_common::{
    maps::{
        CONFIG_MAP, Capacity, DatapathConfig, ENDPOINT_MEMBERS_MAP, ENDPOINTS_MAP, LOCAL_PODS_MAP,
        MapDef, MapSpec, NO_NETNS_ID, OVERLAY_MAP, OverlayConfig, PEER_PORTS_MAP, PINNED_MAPS,
        SERVICE_NAMES_MAP, SERVICES_MAP, SOURCE_RANGES_MAP,
    },
    programs::{
        FROM_PODS, FROM_TUNNEL, FROM_UPLINK, PACKET_PROGRAMS, SOCKET_HOOKS, TO_POD, TO_UPLINK,
        XDP_UPLINK,
    },
};

/// weft's eBPF object, built by this crate's build script from `dataplane-ebpf/`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft-dataplane"));

/// The bench's empty programs (`tc_floor`, `xdp_floor`: the cost of running any program), built
/// beside [`OBJECT`] as an object of their own and embedded only for the bench and the tests.
#[cfg(feature = "bench-floor")]
pub static FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft-floor"));

/// Under the pin directory: the packet programs of the build that runs, for tools that run
/// them (`weft trace`) with the agent's capabilities, which open pins but cannot look programs
/// up by id (that takes CAP_SYS_ADMIN).
pub const PROGRAMS_DIR: &str = "programs";

/// The priority and handle of weft's netlink TC filters: fixed, so a restarted agent replaces
/// its own filters in place and `weft cleanup` finds them.
pub const TC_PRIORITY: u16 = 1;
pub const TC_HANDLE: TcHandle = TcHandle::new(0, 0x7766);

/// How TC programs attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// tcx links where the kernel has them (6.6+), netlink filters before.
    Auto,
    /// tcx links (Linux 6.6+), pinned so they outlive the agent.
    Tcx,
    /// Netlink `clsact` filters at a fixed priority, which outlive the agent by themselves.
    Netlink,
}

impl TcAttach {
    /// What `Auto` means on this kernel.
    #[must_use]
    pub fn resolve(self) -> Self {
        match self {
            Self::Auto if has_tcx() => Self::Tcx,
            Self::Auto => Self::Netlink,
            chosen => chosen,
        }
    }
}

/// Whether and how the XDP filter goes on the uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpChoice {
    /// Driver mode where it costs no offloads: never on veth or virtio-net, and elsewhere only
    /// when attaching it leaves every active feature of the device on.
    Auto,
    /// No XDP program.
    Off,
    /// Driver mode, whatever it costs; the agent fails if the driver has none.
    Native,
    /// Generic (skb) mode: runs after the kernel built the skb, for testing.
    Generic,
}

/// Drivers on which any XDP program costs offloads a device's own features do not show:
/// `veth_fix_features` takes GSO away from the peer of a veth with XDP, and `virtnet_xdp_set`
/// makes the host stop sending a virtio-net guest TSO super-packets and checksum offloads.
pub const COSTLY_XDP_DRIVERS: [&str; 2] = ["veth", "virtio_net"];

/// Where [`Dataplane::attach_xdp_filter`] left the filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XdpPlacement {
    On(XdpMode),
    /// Not attached, and why.
    Off(String),
}

/// The node-wide datapath settings: the cluster CIDR (none: nothing is masqueraded for being
/// off-cluster) and the node's network namespace cookie (0: every namespace's sockets are
/// translated, the node as their client).
#[must_use]
pub fn datapath_config(
    cluster_cidr: Option<ipnet::Ipv4Net>,
    host_netns_cookie: u64,
) -> DatapathConfig {
    let cidr = cluster_cidr.unwrap_or_default();
    DatapathConfig {
        cluster_cidr_addr: cidr.network().octets(),
        cluster_cidr_prefix_len: cidr.prefix_len(),
        _pad: [0; 3],
        host_netns_cookie,
    }
}

/// Map capacities the operator chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLimits {
    pub max_services: u32,
    pub max_endpoints: u32,
    pub ct_entries: u32,
}

impl MapLimits {
    /// The entries a map of `capacity` gets with these limits.
    #[must_use]
    pub const fn entries(&self, capacity: Capacity) -> u32 {
        match capacity {
            Capacity::Fixed(entries) => entries,
            Capacity::Services => self.max_services,
            Capacity::Endpoints => self.max_endpoints,
            Capacity::Conntrack => self.ct_entries,
        }
    }
}

impl Default for MapLimits {
    fn default() -> Self {
        Self {
            max_services: Capacity::Services.default_entries(),
            max_endpoints: Capacity::Endpoints.default_entries(),
            ct_entries: Capacity::Conntrack.default_entries(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "weft needs Linux {MIN_KERNEL} or later and this is {found}: its programs are verified \
         on 5.10, 6.1, 6.12 and newer (see `cargo xtask vm-test`); upgrade the node's kernel"
    )]
    KernelTooOld { found: KernelVersion },
    #[error("cannot create pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not on a BPF filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf`")]
    NotBpffs { path: PathBuf },
    #[error("cannot pin program {name} as {path}")]
    ProgramPin {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot replace the incompatible pinned map {path}")]
    StalePin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the eBPF object failed (is this kernel 5.10 or later, with BTF?)")]
    Load(#[source] aya::EbpfError),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("the kernel rejected program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching {program} to {target} failed")]
    Attach {
        program: &'static str,
        target: String,
        #[source]
        source: ProgramError,
    },
    #[error("map {name} is missing or unusable")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot open cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("attaching programs needs a pin directory, so that they outlive the agent")]
    NotPinned,
    #[error("the kernel returned a link that cannot be pinned for {program} on {target}")]
    Unpinnable {
        program: &'static str,
        target: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error(transparent)]
    LinkPin(#[from] LinkPinError),
}

/// The maps that are recreated together when any of them is stale: they describe the services
/// together (frontends index sets, names own sets, members and ranges mirror both).
const SERVICE_UNIT: [&str; 5] = [
    SERVICES_MAP.name(),
    ENDPOINTS_MAP.name(),
    SERVICE_NAMES_MAP.name(),
    ENDPOINT_MEMBERS_MAP.name(),
    SOURCE_RANGES_MAP.name(),
];

/// Why a pinned map cannot be reused with these `limits`, or `None` when it matches; a pin that
/// differs is from another weft version, or was made with other limits.
fn pin_mismatch(info: &MapInfo, want: &MapSpec, limits: MapLimits) -> Option<String> {
    let map_type = info.map_type().ok();
    if map_type.map(|kind| kind as u32) != Some(want.kind as u32) {
        return Some(format!("type {map_type:?}, want {:?}", want.kind));
    }
    let (key, value) = (info.key_size() as usize, info.value_size() as usize);
    if key != want.key_size || value != want.value_size {
        return Some(format!(
            "key/value size {key}/{value}, want {}/{}",
            want.key_size, want.value_size
        ));
    }
    let entries = limits.entries(want.capacity);
    (info.max_entries() != entries)
        .then(|| format!("{} entries, want {entries}", info.max_entries()))
}

/// Pins the packet programs in `dir`, in place of the last agent's.
fn pin_programs(ebpf: &mut Ebpf, dir: &Path) -> Result<(), DataplaneError> {
    for name in PACKET_PROGRAMS {
        let path = dir.join(name);
        let failed = |source| DataplaneError::ProgramPin {
            name,
            path: path.clone(),
            source,
        };
        crate::datapath::maps::create_pin_dir(dir).map_err(failed)?;
        crate::datapath::maps::remove_pin(&path).map_err(failed)?;
        ebpf.program_mut(name)
            .ok_or(DataplaneError::MissingProgram(name))?
            .pin(&path)
            .map_err(|e| failed(io::Error::other(e)))?;
    }
    Ok(())
}

/// Creates `pin_dir` (root-only) and removes pins whose layout does not match this build, so
/// aya reuses only compatible maps and creates the rest afresh.
fn prepare_pins(pin_dir: &Path, limits: MapLimits) -> Result<(), DataplaneError> {
    crate::datapath::maps::create_pin_dir(pin_dir).map_err(|source| DataplaneError::PinDir {
        path: pin_dir.to_owned(),
        source,
    })?;
    let on_bpffs = nix::sys::statfs::statfs(pin_dir)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
    if !on_bpffs {
        return Err(DataplaneError::NotBpffs {
            path: pin_dir.to_owned(),
        });
    }
    let stale: Vec<(&'static str, String)> = PINNED_MAPS
        .iter()
        .filter_map(|spec| {
            let info = MapInfo::from_pin(pin_dir.join(spec.name)).ok()?;
            pin_mismatch(&info, spec, limits).map(|why| (spec.name, why))
        })
        .collect();
    // The service maps describe one thing together (frontend counts index the slot map): if
    // one is stale, all three are recreated, never a frontend over an empty slot map.
    let services_stale = stale.iter().any(|(name, _)| SERVICE_UNIT.contains(name));
    let recreate = stale
        .iter()
        .map(|(name, _)| *name)
        .chain(SERVICE_UNIT.iter().copied().filter(|_| services_stale))
        .collect::<std::collections::BTreeSet<_>>();
    for name in recreate {
        let why = stale
            .iter()
            .find(|(stale_name, _)| *stale_name == name)
            .map_or("recreated with the other service maps", |(_, why)| {
                why.as_str()
            });
        tracing::warn!(
            map = name,
            %why,
            "pinned map does not match this weft build; recreating it empty \
             (what it held is rebuilt from the sources; connections it tracked start over)"
        );
        let path = pin_dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(DataplaneError::StalePin { path, source }),
        }
    }
    Ok(())
}

/// The oldest kernel series `cargo xtask vm-test` proves weft on.
pub const MIN_KERNEL: KernelVersion = KernelVersion::new(5, 10, 0);

/// What this kernel offers that weft adapts to, for the log line an agent starts with.
#[derive(Debug)]
pub struct KernelSupport {
    pub version: KernelVersion,
    /// Whether socket hooks can fail a call with ECONNREFUSED/EHOSTUNREACH (else EPERM).
    pub socket_errors: bool,
    /// Whether the programs can read the coarse monotonic clock (else the precise one).
    pub coarse_clock: bool,
}

impl KernelSupport {
    /// This kernel's, or an error naming the minimum when it is older than weft supports. A
    /// kernel whose version cannot be read is assumed recent.
    pub fn probe() -> Result<Self, DataplaneError> {
        let version = KernelVersion::current().unwrap_or_else(|_| KernelVersion::new(99, 0, 0));
        if version < MIN_KERNEL {
            return Err(DataplaneError::KernelTooOld { found: version });
        }
        Ok(Self {
            version,
            socket_errors: crate::host::sys::sock_addr_has_set_retval(),
            coarse_clock: crate::host::sys::tc_has_coarse_clock(),
        })
    }
}

/// The socket hooks' global saying whether `bpf_set_retval` may be called (1) or not (0).
const HAS_SET_RETVAL: &str = "HAS_SET_RETVAL";
/// The programs' global saying whether `bpf_ktime_get_coarse_ns` may be called (1) or not (0).
const HAS_COARSE_CLOCK: &str = "HAS_COARSE_CLOCK";

/// Whether TC programs attach through tcx links (Linux 6.6+) rather than netlink clsact filters.
fn has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// The loaded dataplane. Its attachments are pinned (or, as netlink filters, kept by the
/// kernel), so they stay when it is dropped and the agent exits: the node keeps forwarding, and
/// the next agent swaps its programs in; `weft cleanup` removes them.
pub struct Dataplane {
    ebpf: Ebpf,
    /// The attachment pins; `None` for a dataplane that is only run, not attached (tests).
    links: Option<LinkPins>,
    tc_attach: TcAttach,
    /// The bridge ports (ifindex, name) with the service programs attached.
    ports: BTreeMap<u32, String>,
}

impl Dataplane {
    /// Loads `object` (normally [`OBJECT`]) and runs every program through the verifier. With a `pin_dir`, maps are
    /// pinned there and reused from there (after a layout check); without one (tests), maps are
    /// private to this process.
    pub fn load(
        object: &[u8],
        pin_dir: Option<&Path>,
        limits: MapLimits,
        tc_attach: TcAttach,
    ) -> Result<Self, DataplaneError> {
        // A service without endpoints refuses a local connect with ECONNREFUSED where the kernel
        // lets socket hooks set the error, with EPERM before.
        let kernel = KernelSupport::probe()?;
        let has_set_retval = u8::from(kernel.socket_errors);
        let has_coarse_clock = u8::from(kernel.coarse_clock);
        let mut loader = EbpfLoader::new();
        loader
            .override_global(HAS_SET_RETVAL, &has_set_retval, true)
            .override_global(HAS_COARSE_CLOCK, &has_coarse_clock, true);
        for spec in PINNED_MAPS {
            if !matches!(spec.capacity, Capacity::Fixed(_)) {
                loader.map_max_entries(spec.name, limits.entries(spec.capacity));
            }
        }
        if let Some(dir) = pin_dir {
            prepare_pins(dir, limits)?;
            for spec in PINNED_MAPS {
                loader.map_pin_path(spec.name, dir.join(spec.name));
            }
        }
        let mut ebpf = loader.load(object).map_err(DataplaneError::Load)?;
        let links = pin_dir.map(LinkPins::open).transpose()?;
        for name in [FROM_PODS, TO_POD, TO_UPLINK, FROM_UPLINK, FROM_TUNNEL] {
            let program: &mut SchedClassifier = program(&mut ebpf, name)?;
            program
                .load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        let filter: &mut Xdp = program(&mut ebpf, XDP_UPLINK)?;
        filter.load().map_err(|source| DataplaneError::Program {
            name: XDP_UPLINK,
            source,
        })?;
        for name in SOCKET_HOOKS {
            let program: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            program
                .load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        if let Some(dir) = pin_dir {
            pin_programs(&mut ebpf, &dir.join(PROGRAMS_DIR))?;
        }
        Ok(Self {
            ebpf,
            links,
            tc_attach: tc_attach.resolve(),
            ports: BTreeMap::new(),
        })
    }

    /// The loaded object, for taking maps and running programs (tests, tools).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Writes the node-wide datapath settings (see [`datapath_config`]).
    pub fn set_config(&mut self, config: &DatapathConfig) -> Result<(), DataplaneError> {
        self.set_single(CONFIG_MAP, config)
    }

    /// Writes this node's overlay settings (before [`Dataplane::attach_uplink`]).
    pub fn set_overlay(&mut self, config: &OverlayConfig) -> Result<(), DataplaneError> {
        self.set_single(OVERLAY_MAP, config)
    }

    fn set_single<T: aya::Pod>(
        &mut self,
        def: MapDef<u32, T>,
        value: &T,
    ) -> Result<(), DataplaneError> {
        let name = def.name();
        let map = |source| DataplaneError::Map { name, source };
        let mut array: Array<_, T> = Array::try_from(
            self.ebpf
                .map_mut(name)
                .ok_or(map(MapError::ElementNotFound))?,
        )
        .map_err(map)?;
        array.set(0, value, 0).map_err(map)
    }

    /// Attaches service translation to the uplink: DNAT of clients from outside on TC ingress,
    /// reverse NAT of their replies (and the overlay's encapsulation, once configured) on TC
    /// egress.
    pub fn attach_uplink(&mut self, uplink: &str, ifindex: u32) -> Result<(), DataplaneError> {
        self.attach_tc(FROM_UPLINK, uplink, ifindex, TcAttachType::Ingress)?;
        self.attach_tc(TO_UPLINK, uplink, ifindex, TcAttachType::Egress)?;
        Ok(())
    }

    /// Attaches the overlay's rules to the node's `external` VXLAN device (its TC ingress), for
    /// what the kernel decapsulates there.
    pub fn attach_tunnel_device(&mut self, name: &str, ifindex: u32) -> Result<(), DataplaneError> {
        self.attach_tc(FROM_TUNNEL, name, ifindex, TcAttachType::Ingress)
    }

    /// Puts the XDP filter on the uplink as `choice` says (see [`XdpChoice`]); returns the mode
    /// it runs in, or why it does not.
    pub fn attach_xdp_filter(
        &mut self,
        uplink: &str,
        ifindex: u32,
        choice: XdpChoice,
    ) -> Result<XdpPlacement, DataplaneError> {
        let mode = match choice {
            XdpChoice::Off => return Ok(XdpPlacement::Off("--xdp=off".to_owned())),
            XdpChoice::Native => XdpMode::Driver,
            XdpChoice::Generic => XdpMode::Skb,
            XdpChoice::Auto => match crate::host::sys::driver(uplink) {
                Ok(driver) if COSTLY_XDP_DRIVERS.contains(&driver.as_str()) => {
                    return Ok(XdpPlacement::Off(format!(
                        "{driver}: an XDP program there turns offloads off"
                    )));
                }
                Ok(_) => XdpMode::Driver,
                Err(e) => return Ok(XdpPlacement::Off(format!("driver unknown: {e}"))),
            },
        };
        let before = crate::host::sys::active_features(uplink).unwrap_or_default();
        let attached = self.place(XDP_UPLINK, &ifindex.to_string(), |ebpf| {
            let filter: &mut Xdp = program(ebpf, XDP_UPLINK)?;
            let failed = |source| DataplaneError::Attach {
                program: XDP_UPLINK,
                target: uplink.to_owned(),
                source,
            };
            let link = filter.attach(uplink, mode).map_err(failed)?;
            let link = filter.take_link(link).map_err(failed)?;
            FdLink::try_from(link).map_err(|source| DataplaneError::Unpinnable {
                program: XDP_UPLINK,
                target: uplink.to_owned(),
                source,
            })
        });
        match attached {
            Ok(()) => {}
            // Auto falls back to no filter where the driver has no XDP of its own.
            Err(e) if choice == XdpChoice::Auto => {
                return Ok(XdpPlacement::Off(format!("no driver-mode XDP ({e})")));
            }
            Err(e) => return Err(e),
        }
        if choice == XdpChoice::Auto {
            let after = crate::host::sys::active_features(uplink).unwrap_or_default();
            let lost: Vec<String> = before.into_iter().filter(|f| !after.contains(f)).collect();
            if !lost.is_empty() {
                self.detach_xdp_filter(ifindex)?;
                return Ok(XdpPlacement::Off(format!(
                    "attaching it turned off {}",
                    lost.join(", ")
                )));
            }
        }
        Ok(XdpPlacement::On(mode))
    }

    /// Removes the XDP filter from the uplink with `ifindex`, if this agent placed it there.
    fn detach_xdp_filter(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        if let Some(links) = self.links.as_mut() {
            links.remove(&pin_name(XDP_UPLINK, &ifindex.to_string()))?;
        }
        Ok(())
    }

    /// Forgets the ports `keep` rejects (ports that left) and the pods the datapath learned on
    /// them, so no packet is delivered to a port that is gone or now someone else's. Returns
    /// how many pods.
    pub fn forget_pods(&mut self, keep: impl Fn(u32) -> bool) -> Result<usize, DataplaneError> {
        let mut ports = self.hash_map(PEER_PORTS_MAP)?;
        let gone: Vec<u32> = ports
            .keys()
            .filter_map(Result::ok)
            .filter(|port| !keep(*port))
            .collect();
        for port in gone {
            let _ = ports.remove(&port);
        }
        let mut pods = self.hash_map(LOCAL_PODS_MAP)?;
        let gone: Vec<[u8; 4]> = pods
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, pod)| !keep(pod.ifindex))
            .map(|(addr, _)| addr)
            .collect();
        for addr in &gone {
            // Gone already (evicted, or relearned meanwhile) is fine.
            let _ = pods.remove(addr);
        }
        Ok(gone.len())
    }

    /// Attaches service translation to one bridge port (a pod's host-side veth): DNAT on its
    /// ingress (frames from the pod), reverse NAT on its egress (frames to the pod).
    ///
    /// The port, not the bridge device, because its ingress runs before the bridge and before
    /// `br_netfilter`, so netfilter's conntrack (and the masquerade rule) sees the translated
    /// tuple; and because replies between two pods of one node are switched by the bridge and
    /// never reach the bridge device.
    ///
    /// A veth port (`veth`) is also one the overlay delivers into directly: its pods are learned,
    /// and its peer's namespace (`peer_netns`, its id here) is where the pod's sockets are
    /// looked up.
    pub fn attach_pod_port(
        &mut self,
        port: &str,
        ifindex: u32,
        veth: bool,
        peer_netns: Option<i32>,
    ) -> Result<(), DataplaneError> {
        if self.has_pod_port(ifindex) {
            return Ok(());
        }
        self.attach_tc(FROM_PODS, port, ifindex, TcAttachType::Ingress)?;
        if let Err(e) = self.attach_tc(TO_POD, port, ifindex, TcAttachType::Egress) {
            // Never leave a port with only one direction translated.
            self.detach_tc(FROM_PODS, port, ifindex, TcAttachType::Ingress);
            return Err(e);
        }
        self.ports.insert(ifindex, port.to_owned());
        if veth {
            // Its pods are learned from here on (a packet missed meanwhile takes the stack).
            let netns_id = peer_netns
                .and_then(|id| u32::try_from(id).ok())
                .unwrap_or(NO_NETNS_ID);
            self.hash_map(PEER_PORTS_MAP)?
                .insert(ifindex, netns_id, 0)
                .map_err(|source| DataplaneError::Map {
                    name: PEER_PORTS_MAP.name(),
                    source,
                })?;
        }
        Ok(())
    }

    /// A handle on the hash map `name` (LRU or not), for the agent's own writes to maps the
    /// datapath fills (learned pods) or reads alone (peer ports).
    fn hash_map<K: aya::Pod, V: aya::Pod>(
        &mut self,
        def: MapDef<K, V>,
    ) -> Result<aya::maps::HashMap<&mut aya::maps::MapData, K, V>, DataplaneError> {
        let name = def.name();
        let map = |source| DataplaneError::Map { name, source };
        aya::maps::HashMap::try_from(
            self.ebpf
                .map_mut(name)
                .ok_or(map(MapError::ElementNotFound))?,
        )
        .map_err(map)
    }

    /// Whether the port with `ifindex` carries no earlier agent's programs: no tcx link of
    /// weft's is pinned for it. Always `false` with netlink filters, which leave no such trace.
    #[must_use]
    pub fn is_fresh_port(&self, ifindex: u32) -> bool {
        let target = ifindex.to_string();
        self.tc_attach == TcAttach::Tcx
            && self.links.as_ref().is_some_and(|links| {
                [FROM_PODS, TO_POD]
                    .iter()
                    .all(|program| !links.is_pinned(&pin_name(program, &target)))
            })
    }

    /// Whether the port with `ifindex` has the service programs attached.
    #[must_use]
    pub fn has_pod_port(&self, ifindex: u32) -> bool {
        self.ports.contains_key(&ifindex)
    }

    /// Forgets a port that left the bridge or disappeared, and the pods learned on it.
    pub fn detach_pod_port(&mut self, ifindex: u32) {
        if let Some(port) = self.ports.remove(&ifindex) {
            self.detach_tc(FROM_PODS, &port, ifindex, TcAttachType::Ingress);
            self.detach_tc(TO_POD, &port, ifindex, TcAttachType::Egress);
            if let Err(e) = self.forget_pods(|pod_port| pod_port != ifindex) {
                tracing::warn!(port, "forgetting the pods of a port that left: {e}");
            }
        }
    }

    /// The bridge ports (ifindexes) that have the service programs attached.
    pub fn pod_ports(&self) -> impl Iterator<Item = u32> + '_ {
        self.ports.keys().copied()
    }

    /// How many bridge ports have the service programs attached.
    #[must_use]
    pub fn attached_ports(&self) -> usize {
        self.ports.len()
    }

    /// Attaches the socket hooks to a cgroup v2 directory (the root, to cover the whole node),
    /// beside any other programs there (other agents' included, when nodes share a host).
    pub fn attach_socket_hooks(&mut self, cgroup: &Path) -> Result<(), DataplaneError> {
        let open_error = |source| DataplaneError::Cgroup {
            path: cgroup.to_owned(),
            source,
        };
        let dir = fs::File::open(cgroup).map_err(open_error)?;
        // The cgroup's inode names it in the pins: a different --cgroup is a different target.
        let target = format!("cgroup{}", dir.metadata().map_err(open_error)?.ino());
        for name in SOCKET_HOOKS {
            self.place(name, &target, |ebpf| {
                let attach_error = |source| DataplaneError::Attach {
                    program: name,
                    target: cgroup.display().to_string(),
                    source,
                };
                let program: &mut CgroupSockAddr = program(ebpf, name)?;
                // On 5.7+ aya attaches through a bpf_link, which always coexists with other
                // programs and rejects any mode flag, so "Single" (no flag) is the mode that
                // shares the cgroup.
                let link = program
                    .attach(&dir, CgroupAttachMode::Single)
                    .map_err(attach_error)?;
                let link = program.take_link(link).map_err(attach_error)?;
                FdLink::try_from(link).map_err(|source| DataplaneError::Unpinnable {
                    program: name,
                    target: cgroup.display().to_string(),
                    source,
                })
            })?;
        }
        Ok(())
    }

    /// Removes the pinned attachments this agent did not place or take over (ports that left
    /// while no agent ran, an uplink or cgroup no longer used). Call once everything is
    /// attached; returns their names.
    pub fn prune_attachments(&mut self) -> Result<Vec<String>, DataplaneError> {
        Ok(self
            .links
            .as_mut()
            .ok_or(DataplaneError::NotPinned)?
            .prune()?)
    }

    /// Puts `program` on `target`: swaps it into the attachment an earlier agent pinned there,
    /// or else attaches it with `attach` and pins the new link.
    fn place(
        &mut self,
        program: &'static str,
        target: &str,
        attach: impl FnOnce(&mut Ebpf) -> Result<FdLink, DataplaneError>,
    ) -> Result<(), DataplaneError> {
        let links = self.links.as_mut().ok_or(DataplaneError::NotPinned)?;
        let name = pin_name(program, target);
        let fd = self
            .ebpf
            .program(program)
            .ok_or(DataplaneError::MissingProgram(program))?
            .fd()
            .map_err(|source| DataplaneError::Program {
                name: program,
                source,
            })?;
        if links.swap(&name, fd.as_fd())? {
            return Ok(());
        }
        let link = attach(&mut self.ebpf)?;
        links.pin(&name, link)?;
        Ok(())
    }

    fn attach_tc(
        &mut self,
        name: &'static str,
        interface: &str,
        ifindex: u32,
        attach_type: TcAttachType,
    ) -> Result<(), DataplaneError> {
        let attach_error = |source| DataplaneError::Attach {
            program: name,
            target: interface.to_owned(),
            source,
        };
        match self.tc_attach {
            TcAttach::Netlink => {
                if self.links.is_none() {
                    return Err(DataplaneError::NotPinned);
                }
                // Netlink attachment needs the clsact qdisc; it may already be there.
                let _ = qdisc_add_clsact(interface);
                let program: &mut SchedClassifier = program(&mut self.ebpf, name)?;
                // Replace the filter an earlier agent left (in place, atomically), else add it.
                let replaced = SchedClassifierLink::attached(
                    interface,
                    attach_type,
                    TC_PRIORITY,
                    TC_HANDLE,
                    None,
                )
                .map_err(|e| ProgramError::from(aya::programs::tc::TcError::IoError(e)))
                .and_then(|ours| program.attach_to_link(ours));
                let link = match replaced {
                    Ok(link) => link,
                    Err(_) => program
                        .attach_with_options(
                            interface,
                            attach_type,
                            TcAttachOptions::Netlink(NlOptions {
                                priority: TC_PRIORITY,
                                handle: TC_HANDLE,
                                ..NlOptions::default()
                            }),
                        )
                        .map_err(attach_error)?,
                };
                // The filter outlives the agent by itself; aya would delete it when its link
                // is dropped.
                std::mem::forget(program.take_link(link).map_err(attach_error)?);
                Ok(())
            }
            TcAttach::Tcx | TcAttach::Auto => self.place(name, &ifindex.to_string(), |ebpf| {
                let program: &mut SchedClassifier = program(ebpf, name)?;
                let link = program
                    .attach(interface, attach_type)
                    .map_err(attach_error)?;
                let link = program.take_link(link).map_err(attach_error)?;
                FdLink::try_from(link).map_err(|source| DataplaneError::Unpinnable {
                    program: name,
                    target: interface.to_owned(),
                    source,
                })
            }),
        }
    }

    /// Detaches `name` from a port (a vanished device took its attachment with it already;
    /// what is left is the pin, or nothing for netlink filters).
    fn detach_tc(
        &mut self,
        name: &'static str,
        interface: &str,
        ifindex: u32,
        attach_type: TcAttachType,
    ) {
        let result = match (self.tc_attach, self.links.as_mut()) {
            (TcAttach::Netlink, _) => {
                detach_netlink_filter(interface, attach_type);
                Ok(())
            }
            (_, Some(links)) => links.remove(&pin_name(name, &ifindex.to_string())),
            (_, None) => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(port = interface, "detaching {name}: {e}");
        }
    }
}

/// Deletes weft's netlink filter from one hook of `interface`; none there is no error.
pub fn detach_netlink_filter(interface: &str, attach_type: TcAttachType) {
    if let Ok(ours) =
        SchedClassifierLink::attached(interface, attach_type, TC_PRIORITY, TC_HANDLE, None)
    {
        // Fails when the filter (or the device) is already gone, which is the goal.
        let _ = aya::programs::links::Link::detach(ours);
    }
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DataplaneError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

/// Where the cgroup v2 hierarchy is mounted (the socket hooks attach to its root).
#[must_use]
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (fields, rest) = line.split_once(" - ")?;
        let fs_type = rest.split_whitespace().next()?;
        let mount_point = fields.split_whitespace().nth(4)?;
        (fs_type == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use aya::maps::MapType;
    use weft_common::maps::MapKind;

    use super::*;

    /// The object's maps and programs are exactly the ones `weft_common` defines (so none is
    /// missing, and nothing else ships in it, such as the bench's empty programs), each map
    /// with the kind, key and value sizes and default capacity defined there.
    #[test]
    fn the_object_holds_exactly_the_maps_and_programs_common_defines() {
        let object = aya_obj::Object::parse(OBJECT).expect("the embedded object parses");
        let maps: BTreeSet<&str> = object.maps.keys().map(String::as_str).collect();
        let defined: BTreeSet<&str> = PINNED_MAPS.iter().map(|spec| spec.name).collect();
        // Besides weft's maps, aya's own: the object's globals (`.bss`, `.data`, `.rodata`).
        let others: Vec<&str> = maps
            .difference(&defined)
            .copied()
            .filter(|name| !name.starts_with('.'))
            .collect();
        assert!(others.is_empty(), "maps not in weft_common: {others:?}");
        for spec in PINNED_MAPS {
            let map = object
                .maps
                .get(spec.name)
                .unwrap_or_else(|| panic!("map {} is not in the object", spec.name));
            assert_eq!(map.map_type(), spec.kind as u32, "{}", spec.name);
            assert_eq!(map.key_size() as usize, spec.key_size, "{}", spec.name);
            assert_eq!(map.value_size() as usize, spec.value_size, "{}", spec.name);
            assert_eq!(
                map.max_entries(),
                spec.capacity.default_entries(),
                "{}",
                spec.name
            );
        }
        let programs: BTreeSet<&str> = object.programs.keys().map(String::as_str).collect();
        let defined: BTreeSet<&str> = PACKET_PROGRAMS.into_iter().chain(SOCKET_HOOKS).collect();
        assert_eq!(programs, defined);
        assert!(
            object.btf.is_some(),
            "the object carries BTF, so bpftool prints field names"
        );
    }

    #[test]
    fn default_limits_are_the_object_defaults() {
        for spec in PINNED_MAPS {
            assert_eq!(
                MapLimits::default().entries(spec.capacity),
                spec.capacity.default_entries()
            );
        }
        assert_eq!(MapKind::LpmTrie as u32, MapType::LpmTrie as u32);
        assert_eq!(MapKind::LruHash as u32, MapType::LruHash as u32);
        assert_eq!(MapKind::PerCpuArray as u32, MapType::PerCpuArray as u32);
        assert_eq!(MapKind::Array as u32, MapType::Array as u32);
        assert_eq!(MapKind::Hash as u32, MapType::Hash as u32);
    }
}
