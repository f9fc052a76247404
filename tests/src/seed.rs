//! The seed document's example (section 3): Service `nginx`, ClusterIP `10.254.40.119`, port
//! 4432 to targetPort 80 on three pods `172.30.20.6/.7/.8`, in the pod network `172.30.0.0/16`.

use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 254, 40, 119);
pub const PORT: u16 = 4432;
pub const TARGET_PORT: u16 = 80;
pub const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(172, 30, 20, 6),
    Ipv4Addr::new(172, 30, 20, 7),
    Ipv4Addr::new(172, 30, 20, 8),
];

/// The service address clients use.
#[must_use]
pub fn frontend() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, PORT)
}

/// The node's pod subnet in the seed (flannel's lease `172.30.20.0-24`).
#[must_use]
pub fn pod_subnet() -> Ipv4Net {
    "172.30.20.0/24".parse().expect("valid CIDR")
}

/// The seed's flannel Network.
#[must_use]
pub fn cluster_cidr() -> Ipv4Net {
    "172.30.0.0/16".parse().expect("valid CIDR")
}

/// A Service manifest.
#[must_use]
pub fn service(name: &str, vip: Ipv4Addr, port: u16, protocol: &str, target_port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  clusterIP: {vip}\n  ports: [{{port: {port}, targetPort: {target_port}, protocol: {protocol}}}]\n"
    )
}

/// An EndpointSlice manifest for service `name` with `endpoints` on `port`.
#[must_use]
pub fn endpoint_slice(name: &str, protocol: &str, port: u16, endpoints: &[Ipv4Addr]) -> String {
    let mut text = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-slice\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\n\
         ports: [{{port: {port}, protocol: {protocol}}}]\nendpoints:\n"
    );
    for endpoint in endpoints {
        text.push_str(&format!("- addresses: [\"{endpoint}\"]\n"));
    }
    if endpoints.is_empty() {
        text = text.replace("endpoints:\n", "endpoints: []\n");
    }
    text
}

/// The seed's nginx Service and its EndpointSlice, as one manifest file.
#[must_use]
pub fn nginx_manifest(endpoints: &[Ipv4Addr]) -> String {
    format!(
        "{}---\n{}",
        service("nginx", VIP, PORT, "TCP", TARGET_PORT),
        endpoint_slice("nginx", "TCP", TARGET_PORT, endpoints)
    )
}
