//! The node's settings, validated once from the flags: the rest of the agent takes these, never
//! the command line.

use std::{
    borrow::Cow,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
};

use ipnet::Ipv4Net;

use crate::{
    datapath::loader::{MapLimits, TcAttach, XdpChoice},
    sources::etcd::client::TlsFiles,
    sources::flannel::{NetworkConfig, annotations::Annotations},
};

/// Where pod traffic to and from other nodes is routed (`--host-routing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HostRouting {
    Ebpf,
    Kernel,
}

/// Which sockets the socket hooks translate (`--socket-lb`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketLb {
    All,
    HostOnly,
}

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceSource {
    /// A directory of manifests, followed as files change.
    Manifests(PathBuf),
    /// The Kubernetes API: with this kubeconfig, or (`None`) the pod's service account.
    Kubernetes { kubeconfig: Option<PathBuf> },
    /// No services: only the overlay.
    None,
}

impl ServiceSource {
    /// The source the flags and the environment call for: manifests if given, else a
    /// kubeconfig if given, else the service account when running in a pod.
    #[must_use]
    pub fn choose(manifests: Option<PathBuf>, kubeconfig: Option<PathBuf>, in_pod: bool) -> Self {
        match (manifests, kubeconfig) {
            (Some(dir), _) => Self::Manifests(dir),
            (None, Some(path)) => Self::Kubernetes {
                kubeconfig: Some(path),
            },
            (None, None) if in_pod => Self::Kubernetes { kubeconfig: None },
            (None, None) => Self::None,
        }
    }
}

/// flannel's etcd backend: where its config and the leases are.
#[derive(Clone, Debug)]
pub struct Etcd {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub tls: TlsFiles,
}

/// flannel's kube subnet manager: the network config from `net-conf.json`, the leases in
/// Node annotations.
#[derive(Clone, Debug)]
pub struct KubeSubnets {
    pub network: NetworkConfig,
    pub annotations: Annotations,
    /// Set the Node's `NetworkUnavailable` condition to False once the lease is published.
    pub set_network_unavailable: bool,
}

/// Where the overlay's leases are kept: flannel's two subnet managers.
#[derive(Clone, Debug)]
pub enum SubnetManager {
    Etcd(Etcd),
    Kube(KubeSubnets),
}

/// Everything the agent needs to know about its node, checked before anything is touched.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's name, as its Node object and its EndpointSlice entries have it.
    pub node_name: String,
    /// Where the maps are pinned (on a BPF filesystem).
    pub pin_dir: PathBuf,
    pub services: ServiceSource,
    /// NodePorts are served only on addresses inside these (empty: every non-loopback one).
    pub nodeport_addresses: Vec<Ipv4Net>,
    pub healthz_bind_address: SocketAddr,
    pub metrics_bind_address: SocketAddr,
    /// The bridge local pods are attached to.
    pub bridge: String,
    /// The pod subnet given by hand (a node without etcd).
    pub pod_subnet: Option<Ipv4Net>,
    /// The cluster's pod network, for masquerade (default: the flannel Network).
    pub cluster_cidr: Option<Ipv4Net>,
    /// The cgroup v2 directory whose sockets get service translation.
    pub cgroup: PathBuf,
    pub socket_lb: SocketLb,
    pub tc_attach: TcAttach,
    /// The eBPF object: the one built into weft, or another build read from a file.
    pub object: Cow<'static, [u8]>,
    pub limits: MapLimits,
    /// flannel's subnet manager, etcd or the Kubernetes API, which turns the overlay on.
    pub subnets: Option<SubnetManager>,
    /// The uplink given by hand (default: the default route's interface).
    pub iface: Option<String>,
    /// This node's underlay address given by hand (default: the uplink's first).
    pub public_ip: Option<Ipv4Addr>,
    /// Where flannel's subnet.env is written.
    pub subnet_file: PathBuf,
    /// Masquerade pod traffic leaving the pod network (flannel's `--ip-masq`).
    pub ip_masq: bool,
    pub host_routing: HostRouting,
    /// Whether the overlay keeps its `external` VXLAN device.
    pub vxlan_device: bool,
    pub xdp: XdpChoice,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_source_is_chosen_as_documented() {
        let dir = || Some(PathBuf::from("/etc/weft/manifests"));
        let kubeconfig = || Some(PathBuf::from("/etc/kubernetes/kubeconfig"));
        assert_eq!(
            ServiceSource::choose(dir(), kubeconfig(), true),
            ServiceSource::Manifests(dir().unwrap())
        );
        assert_eq!(
            ServiceSource::choose(None, kubeconfig(), false),
            ServiceSource::Kubernetes {
                kubeconfig: kubeconfig()
            }
        );
        assert_eq!(
            ServiceSource::choose(None, None, true),
            ServiceSource::Kubernetes { kubeconfig: None }
        );
        assert_eq!(
            ServiceSource::choose(None, None, false),
            ServiceSource::None
        );
    }
}
