//! `BPF_PROG_TEST_RUN` harness: the real eBPF object, loaded (not attached) with private maps
//! that are filled exactly as the agent fills them, from manifests through the model and the
//! reconciler.

use std::{collections::BTreeMap, time::Duration};

use aya::{
    maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray},
    programs::{ProgramError, SchedClassifier, TestRun as _, TestRunOptions},
};
use ipnet::Ipv4Net;
use weft::{
    datapath::conntrack::Conntrack,
    datapath::loader::{Dataplane, MapLimits, OBJECT, TcAttach, datapath_config},
    datapath::maps::AyaMaps,
    model::{Model, NodeFacts},
    reconcile::Reconciler,
    sources::manifests::{Scan, apply, parse_into},
};
use weft_common::{
    drop_reason::DropReason,
    maps::{
        CONNTRACK_MAP, CtKey, CtValue, DROPS_MAP, FRAGMENTS_MAP, FragKey, FragValue,
        LOCAL_PODS_MAP, LocalPod, NO_NETNS_ID, PEER_PORTS_MAP,
    },
};

/// `TC_ACT_UNSPEC`: the packet goes on (to the next program or the stack).
pub const VERDICT_PASS: u32 = u32::MAX;
/// `TC_ACT_SHOT`: dropped.
pub const VERDICT_DROP: u32 = 2;
/// `TC_ACT_REDIRECT`: sent out of another (or the same) interface by the program.
pub const VERDICT_REDIRECT: u32 = 7;

/// Size of `struct __sk_buff`, the context a TC program's test run takes and returns.
const SKB_CONTEXT_LEN: usize = 192;
/// Offset of `mark` in `struct __sk_buff`.
const SKB_MARK: usize = 8;
/// Offset of `ifindex` in `struct __sk_buff`: the device the test run's skb is on.
const SKB_IFINDEX: usize = 40;
/// Offsets of `gso_segs` and `gso_size` in `struct __sk_buff`.
const SKB_GSO_SEGS: usize = 164;
const SKB_GSO_SIZE: usize = 176;

/// The skb fields a test run sets.
struct Skb {
    mark: u32,
    ifindex: u32,
    gso_size: u32,
}

/// What one program run did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    pub verdict: u32,
    pub output: Vec<u8>,
    pub mark: u32,
    /// The kernel's average time per repetition.
    pub duration: Duration,
}

/// A loaded dataplane with its service maps behind the agent's reconciler.
pub struct Datapath {
    dataplane: Dataplane,
    reconciler: Reconciler<AyaMaps>,
    conntrack: Conntrack,
    /// A second handle on the conntrack map, for tests that set its contents (the agent's
    /// [`Conntrack`] only reads and sweeps).
    conntrack_writer: BpfHashMap<MapData, CtKey, CtValue>,
    model: Model,
    scan: Scan,
    /// The bench's empty programs, once [`Datapath::load_floor`] loaded them.
    floor: Option<aya::Ebpf>,
}

/// The empty TC program of the floor object.
pub const TC_FLOOR: &str = "tc_floor";
/// The empty XDP program of the floor object.
pub const XDP_FLOOR: &str = "xdp_floor";

impl Datapath {
    /// Loads the object and programs `manifests` (YAML, as in a manifest file).
    pub fn new(manifests: &str, cluster_cidr: Option<Ipv4Net>) -> Self {
        Self::with_limits(manifests, cluster_cidr, MapLimits::default())
    }

    /// As [`Datapath::new`], with chosen map sizes. `WEFT_BPF_OBJECT` (as the agent's flag)
    /// runs the fixtures against another build of the programs.
    pub fn with_limits(manifests: &str, cluster_cidr: Option<Ipv4Net>, limits: MapLimits) -> Self {
        crate::netns::require_root();
        let other = std::env::var_os("WEFT_BPF_OBJECT")
            .map(|path| std::fs::read(&path).expect("reading WEFT_BPF_OBJECT"));
        let mut dataplane = Dataplane::load(
            other.as_deref().unwrap_or(OBJECT),
            None,
            limits,
            TcAttach::Auto,
        )
        .expect("the kernel accepts every program");
        dataplane
            .set_config(&datapath_config(cluster_cidr, 0))
            .expect("writing the datapath config");
        let maps = AyaMaps::open(dataplane.ebpf_mut()).expect("service maps");
        let conntrack_id = match dataplane.ebpf_mut().map(CONNTRACK_MAP.name()) {
            Some(Map::LruHashMap(data)) => data.info().expect("conntrack map info").id(),
            _ => panic!("the conntrack map is an LRU hash map"),
        };
        let conntrack_writer = BpfHashMap::try_from(Map::LruHashMap(
            MapData::from_id(conntrack_id).expect("reopen"),
        ))
        .expect("a conntrack map handle");
        let conntrack = Conntrack::open(dataplane.ebpf_mut()).expect("conntrack map");
        let mut datapath = Self {
            dataplane,
            reconciler: Reconciler::adopt(maps).expect("empty maps adopt"),
            conntrack,
            conntrack_writer,
            model: Model::default(),
            scan: Scan::default(),
            floor: None,
        };
        datapath.set_manifests(manifests);
        datapath
    }

    /// Replaces the manifests and reconciles, as the agent does when a file changes.
    pub fn set_manifests(&mut self, manifests: &str) {
        let mut scan = Scan::default();
        parse_into(manifests, "fixture.yaml", &mut scan);
        assert!(
            scan.problems.is_empty(),
            "fixture manifests are valid: {:?}",
            scan.problems
        );
        apply(&mut self.model, &self.scan, &scan);
        self.scan = scan;
        let report = self.reconciler.reconcile(&self.model.desired());
        assert!(
            report.failed.is_empty(),
            "fixture services fit: {:?}",
            report.failed
        );
    }

    /// Changes what the model knows of this node (its name, zone, NodePort addresses), as the
    /// agent's sources would, and reconciles.
    pub fn set_node(&mut self, update: impl FnOnce(&mut NodeFacts)) {
        self.model.update_node(update);
        let report = self.reconciler.reconcile(&self.model.desired());
        assert!(report.failed.is_empty(), "{:?}", report.failed);
    }

    /// Adds (or replaces) another node's lease, as the etcd source would, and reconciles.
    pub fn set_lease(&mut self, subnet: ipnet::Ipv4Net, lease: weft::model::NodeLease) {
        self.set_leases([(subnet, lease)]);
    }

    /// Adds (or replaces) other nodes' leases, as the etcd source would, and reconciles once.
    pub fn set_leases(
        &mut self,
        leases: impl IntoIterator<Item = (ipnet::Ipv4Net, weft::model::NodeLease)>,
    ) {
        for (subnet, lease) in leases {
            self.model.set_lease(subnet, lease);
        }
        let report = self.reconciler.reconcile(&self.model.desired());
        assert!(report.node_failed.is_empty(), "{:?}", report.node_failed);
    }

    /// Sets the next hops towards the members, as the next-hop source would, and reconciles.
    pub fn set_next_hops(
        &mut self,
        next_hops: std::collections::BTreeMap<std::net::Ipv4Addr, weft::model::NextHop>,
    ) {
        self.model.set_next_hops(next_hops);
        let report = self.reconciler.reconcile(&self.model.desired());
        assert!(report.node_failed.is_empty(), "{:?}", report.node_failed);
    }

    /// Writes this node's overlay settings.
    pub fn set_overlay(&mut self, config: &weft_common::maps::OverlayConfig) {
        self.dataplane
            .set_overlay(config)
            .expect("writing the overlay config");
    }

    /// Runs `program` once on `frame` with `mark` in the skb.
    pub fn run(&mut self, program: &str, frame: &[u8], mark: u32) -> Run {
        self.run_repeated(program, frame, mark, 1)
    }

    /// Runs `program` once on `frame` as if on device `ifindex` (of the calling thread's
    /// network namespace, which is also where helpers such as the FIB lookup look).
    pub fn run_on(&mut self, program: &str, frame: &[u8], ifindex: u32) -> Run {
        self.run_with(program, frame, 0, ifindex, 1)
    }

    /// Runs `program` `repeat` times on `frame` (the kernel reports the average duration).
    pub fn run_repeated(&mut self, name: &str, frame: &[u8], mark: u32, repeat: u32) -> Run {
        self.run_with(name, frame, mark, 0, repeat)
    }

    /// Loads the empty programs the bench measures as its floor ([`TC_FLOOR`], [`XDP_FLOOR`],
    /// from [`weft::datapath::loader::FLOOR_OBJECT`]); they run by name as the others do.
    pub fn load_floor(&mut self) {
        let mut floor =
            aya::Ebpf::load(weft::datapath::loader::FLOOR_OBJECT).expect("the floor object loads");
        let tc: &mut SchedClassifier = floor
            .program_mut(TC_FLOOR)
            .expect("the TC floor program")
            .try_into()
            .expect("a TC program");
        tc.load().expect("loading the TC floor");
        let xdp: &mut aya::programs::Xdp = floor
            .program_mut(XDP_FLOOR)
            .expect("the XDP floor program")
            .try_into()
            .expect("an XDP program");
        xdp.load().expect("loading the XDP floor");
        self.floor = Some(floor);
    }

    /// The program `name`: one of the dataplane's, or of the floor once loaded.
    fn program_mut(&mut self, name: &str) -> &mut aya::programs::Program {
        let floor = self
            .floor
            .as_mut()
            .and_then(|floor| floor.program_mut(name));
        match floor {
            Some(program) => program,
            None => self
                .dataplane
                .ebpf_mut()
                .program_mut(name)
                .unwrap_or_else(|| panic!("no program {name}")),
        }
    }

    /// Runs the XDP program `name` once on `frame`: the action and the frame it leaves.
    pub fn run_xdp(&mut self, name: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        let (action, output, _) = self.run_xdp_repeated(name, frame, 1);
        (action, output)
    }

    /// Runs the XDP program `name` `repeat` times on `frame`: the action, the frame it leaves
    /// and the kernel's average time per run.
    pub fn run_xdp_repeated(
        &mut self,
        name: &str,
        frame: &[u8],
        repeat: u32,
    ) -> (u32, Vec<u8>, Duration) {
        self.try_run_xdp(name, frame, repeat)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {name} on {frame:02x?}: {e}"))
    }

    /// As [`Datapath::run_xdp_repeated`], with the kernel's refusal to run (a frame it will not
    /// build a packet from) returned rather than a panic.
    pub fn try_run_xdp(
        &mut self,
        name: &str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, Vec<u8>, Duration), ProgramError> {
        let program: &mut aya::programs::Xdp =
            self.program_mut(name).try_into().expect("an XDP program");
        let mut output = vec![0u8; frame.len() + 256];
        let result = program.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut output),
            repeat,
            ..TestRunOptions::default()
        })?;
        output.truncate(result.data_size_out as usize);
        Ok((result.return_value, output, result.duration))
    }

    /// The loaded program `name`, for runs from several threads at once
    /// ([`weft::host::sys::bpf_prog_test_run`], on the same maps).
    pub fn program_fd(&mut self, name: &str) -> std::os::fd::OwnedFd {
        use std::os::fd::AsFd as _;
        self.dataplane
            .ebpf_mut()
            .program(name)
            .expect("program exists")
            .fd()
            .expect("a loaded program")
            .as_fd()
            .try_clone_to_owned()
            .expect("duplicating a program fd")
    }

    /// Runs the TC program `name` `repeat` times on `frame`, with `mark` in the skb, as if on
    /// device `ifindex` (0: none).
    pub fn run_with(
        &mut self,
        name: &str,
        frame: &[u8],
        mark: u32,
        ifindex: u32,
        repeat: u32,
    ) -> Run {
        self.try_run_with(name, frame, mark, ifindex, repeat)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {name} on {frame:02x?}: {e}"))
    }

    /// As [`Datapath::run_with`], with the kernel's refusal to run (a frame it will not build
    /// an skb from) returned rather than a panic.
    pub fn try_run_with(
        &mut self,
        name: &str,
        frame: &[u8],
        mark: u32,
        ifindex: u32,
        repeat: u32,
    ) -> Result<Run, ProgramError> {
        self.try_run_skb(
            name,
            frame,
            &Skb {
                mark,
                ifindex,
                gso_size: 0,
            },
            repeat,
        )
    }

    /// Runs the TC program `name` once on `frame` as a GSO skb of `gso_size`-byte segments on
    /// device `ifindex`. The test run sets no GSO type, which some helpers refuse.
    pub fn run_gso_on(&mut self, name: &str, frame: &[u8], ifindex: u32, gso_size: u32) -> Run {
        let skb = Skb {
            mark: 0,
            ifindex,
            gso_size,
        };
        self.try_run_skb(name, frame, &skb, 1)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {name} on {frame:02x?}: {e}"))
    }

    fn try_run_skb(
        &mut self,
        name: &str,
        frame: &[u8],
        skb: &Skb,
        repeat: u32,
    ) -> Result<Run, ProgramError> {
        let program: &mut SchedClassifier =
            self.program_mut(name).try_into().expect("a TC program");
        let mut context = [0u8; SKB_CONTEXT_LEN];
        context[SKB_MARK..SKB_MARK + 4].copy_from_slice(&skb.mark.to_ne_bytes());
        context[SKB_IFINDEX..SKB_IFINDEX + 4].copy_from_slice(&skb.ifindex.to_ne_bytes());
        if skb.gso_size != 0 {
            let payload = u32::try_from(frame.len()).unwrap_or(u32::MAX);
            let segments = payload.div_ceil(skb.gso_size);
            context[SKB_GSO_SEGS..SKB_GSO_SEGS + 4].copy_from_slice(&segments.to_ne_bytes());
            context[SKB_GSO_SIZE..SKB_GSO_SIZE + 4].copy_from_slice(&skb.gso_size.to_ne_bytes());
        }
        let mut context_out = [0u8; SKB_CONTEXT_LEN];
        let mut output = vec![0u8; frame.len() + 256];
        let result = program.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut output),
            ctx_in: Some(&context),
            ctx_out: Some(&mut context_out),
            repeat,
            ..TestRunOptions::default()
        })?;
        output.truncate(result.data_size_out as usize);
        Ok(Run {
            verdict: result.return_value,
            output,
            mark: u32::from_ne_bytes(
                context_out[SKB_MARK..SKB_MARK + 4]
                    .try_into()
                    .expect("4 bytes"),
            ),
            duration: result.duration,
        })
    }

    /// Registers `ifindex` as a veth pod port, as the agent does when it attaches to one: the
    /// datapath learns the pods behind it.
    pub fn add_peer_port(&mut self, ifindex: u32) {
        let map = self
            .dataplane
            .ebpf_mut()
            .map_mut(PEER_PORTS_MAP.name())
            .expect("the peer ports map");
        let mut ports: BpfHashMap<_, u32, u32> = BpfHashMap::try_from(map).expect("a hash map");
        ports
            .insert(ifindex, NO_NETNS_ID, 0)
            .expect("registering a port");
    }

    /// This node's pods as the datapath learned them: (address, pod).
    pub fn local_pods(&mut self) -> Vec<([u8; 4], LocalPod)> {
        let map = self
            .dataplane
            .ebpf_mut()
            .map(LOCAL_PODS_MAP.name())
            .expect("the local pods map");
        let pods: BpfHashMap<_, [u8; 4], LocalPod> = BpfHashMap::try_from(map).expect("a hash map");
        pods.iter()
            .map(|entry| entry.expect("reading a pod"))
            .collect()
    }

    /// Makes `pods` the learned pods' whole contents.
    pub fn set_local_pods(&mut self, pods: &[([u8; 4], LocalPod)]) {
        let map = self
            .dataplane
            .ebpf_mut()
            .map_mut(LOCAL_PODS_MAP.name())
            .expect("the local pods map");
        replace_contents(&mut BpfHashMap::try_from(map).expect("a hash map"), pods);
    }

    /// Drop counters summed over CPUs, non-zero ones only.
    pub fn drops(&mut self) -> BTreeMap<DropReason, u64> {
        let map = self
            .dataplane
            .ebpf_mut()
            .map(DROPS_MAP.name())
            .expect("drop counters");
        let drops: PerCpuArray<_, u64> = PerCpuArray::try_from(map).expect("a per-CPU array");
        DropReason::ALL
            .iter()
            .filter_map(|reason| {
                let total: u64 = drops
                    .get(&(*reason as u32), 0)
                    .expect("counter")
                    .iter()
                    .sum();
                (total > 0).then_some((*reason, total))
            })
            .collect()
    }

    /// Every conntrack entry.
    pub fn conntrack(&self) -> Vec<(CtKey, CtValue)> {
        self.conntrack.entries().expect("reading conntrack")
    }

    /// Makes `entries` the conntrack map's whole contents.
    pub fn set_conntrack(&mut self, entries: &[(CtKey, CtValue)]) {
        replace_contents(&mut self.conntrack_writer, entries);
    }

    /// The fragmented datagrams the datapath knows of.
    pub fn fragments(&mut self) -> Vec<(FragKey, FragValue)> {
        let map = self
            .dataplane
            .ebpf_mut()
            .map(FRAGMENTS_MAP.name())
            .expect("the fragments map");
        let map: BpfHashMap<_, FragKey, FragValue> = BpfHashMap::try_from(map).expect("a hash map");
        map.iter()
            .map(|entry| entry.expect("reading a datagram"))
            .collect()
    }

    /// Makes `entries` the fragment map's whole contents.
    pub fn set_fragments(&mut self, entries: &[(FragKey, FragValue)]) {
        let map = self
            .dataplane
            .ebpf_mut()
            .map_mut(FRAGMENTS_MAP.name())
            .expect("the fragments map");
        replace_contents(&mut BpfHashMap::try_from(map).expect("a hash map"), entries);
    }
}

/// Makes `entries` the whole contents of `map`.
fn replace_contents<T, K, V>(map: &mut BpfHashMap<T, K, V>, entries: &[(K, V)])
where
    T: std::borrow::BorrowMut<MapData>,
    K: aya::Pod + PartialEq + std::fmt::Debug,
    V: aya::Pod,
{
    let extra: Vec<K> = map
        .keys()
        .map(|key| key.expect("reading a key"))
        .filter(|key| !entries.iter().any(|(kept, _)| kept == key))
        .collect();
    for key in extra {
        map.remove(&key)
            .unwrap_or_else(|e| panic!("removing {key:?}: {e}"));
    }
    for (key, value) in entries {
        map.insert(key, value, 0)
            .unwrap_or_else(|e| panic!("writing {key:?}: {e}"));
    }
}
