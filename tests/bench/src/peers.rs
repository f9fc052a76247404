//! The same services, written as each contender takes them: weft's manifests, kube-proxy's
//! iptables ruleset (its `iptables-restore` input) and kube-proxy's nftables ruleset (its
//! `nft -f` input), the latter two laid out as kube-proxy lays them out.

use std::{fmt::Write as _, net::Ipv4Addr};

use ipnet::Ipv4Net;

/// One ClusterIP service port: TCP `vip:port` to `endpoints` on `target_port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchService {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub endpoints: Vec<Ipv4Addr>,
}

impl BenchService {
    fn name(index: usize) -> String {
        format!("svc-{index}")
    }
}

/// `count` services with VIPs from 10.96.0.1 up, each on port 80 to all of `endpoints`.
#[must_use]
pub fn services(count: usize, endpoints: &[Ipv4Addr], target_port: u16) -> Vec<BenchService> {
    (0..count)
        .map(|i| {
            let n = u32::try_from(i).expect("fewer than 2^32 services") + 1;
            BenchService {
                vip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + n),
                port: 80,
                target_port,
                endpoints: endpoints.to_vec(),
            }
        })
        .collect()
}

/// weft's manifests: a Service and an EndpointSlice per service, as `kubectl get -o yaml` would
/// give them (one file).
#[must_use]
pub fn manifests(services: &[BenchService]) -> String {
    let mut out = String::new();
    for (i, service) in services.iter().enumerate() {
        out.push_str(&manifest(i, service));
    }
    out
}

/// The manifest of service number `index` alone.
#[must_use]
pub fn manifest(index: usize, service: &BenchService) -> String {
    let name = BenchService::name(index);
    let mut out = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\n\
         spec: {{clusterIP: {}, ports: [{{port: {}, targetPort: {}, protocol: TCP}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, namespace: bench, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{port: {}, protocol: TCP}}]\nendpoints:\n",
        service.vip, service.port, service.target_port, service.target_port
    );
    for endpoint in &service.endpoints {
        let _ = writeln!(out, "- {{addresses: [\"{endpoint}\"]}}");
    }
    out
}

fn svc_chain(index: usize) -> String {
    format!("KUBE-SVC-{index:016X}")
}

fn sep_chain(index: usize, endpoint: usize) -> String {
    format!("KUBE-SEP-{index:012X}{endpoint:04X}")
}

/// The chains and rules of one service: `KUBE-SVC-*` picking an endpoint with
/// `statistic --mode random --probability 1/(n-i)`, and a `KUBE-SEP-*` per endpoint that marks
/// hairpin traffic and DNATs.
fn iptables_service(out: &mut String, index: usize, service: &BenchService, cidr: Ipv4Net) {
    let svc = svc_chain(index);
    let (vip, port) = (service.vip, service.port);
    let _ = writeln!(
        out,
        "-A {svc} ! -s {cidr} -d {vip}/32 -p tcp -m comment --comment \"bench/{}:http cluster IP\" \
         -m tcp --dport {port} -j KUBE-MARK-MASQ",
        BenchService::name(index)
    );
    let count = service.endpoints.len();
    for (e, _) in service.endpoints.iter().enumerate() {
        let sep = sep_chain(index, e);
        let remaining = count - e;
        if remaining > 1 {
            #[expect(clippy::cast_precision_loss, reason = "endpoint counts are small")]
            let probability = 1.0 / remaining as f64;
            let _ = writeln!(
                out,
                "-A {svc} -m statistic --mode random --probability {probability:.10} -j {sep}"
            );
        } else {
            let _ = writeln!(out, "-A {svc} -j {sep}");
        }
    }
    for (e, endpoint) in service.endpoints.iter().enumerate() {
        let sep = sep_chain(index, e);
        let _ = writeln!(out, "-A {sep} -s {endpoint}/32 -j KUBE-MARK-MASQ");
        let _ = writeln!(
            out,
            "-A {sep} -p tcp -m tcp -j DNAT --to-destination {endpoint}:{}",
            service.target_port
        );
    }
}

fn iptables_declare(out: &mut String, index: usize, service: &BenchService) {
    let _ = writeln!(out, ":{} - [0:0]", svc_chain(index));
    for e in 0..service.endpoints.len() {
        let _ = writeln!(out, ":{} - [0:0]", sep_chain(index, e));
    }
}

fn iptables_services_chain(out: &mut String, services: &[BenchService]) {
    for (i, service) in services.iter().enumerate() {
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"bench/{}:http cluster IP\" \
             -m tcp --dport {} -j {}",
            service.vip,
            BenchService::name(i),
            service.port,
            svc_chain(i)
        );
    }
}

/// kube-proxy's whole `nat` table for `services` (what a full sync restores).
#[must_use]
pub fn iptables_ruleset(services: &[BenchService], cidr: Ipv4Net) -> String {
    let mut out = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    for (i, service) in services.iter().enumerate() {
        iptables_declare(&mut out, i, service);
    }
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" \
         -j MASQUERADE --random-fully\n",
    );
    iptables_services_chain(&mut out, services);
    for (i, service) in services.iter().enumerate() {
        iptables_service(&mut out, i, service, cidr);
    }
    out.push_str("COMMIT\n");
    out
}

/// The `filter` table a flannel + kube-proxy node has: kube-proxy's chains on the input,
/// forward and output paths (each forwarded packet meets its conntrack state matches in
/// `KUBE-FORWARD`) and flannel's `FLANNEL-FWD`, which accepts the pod `network` both ways.
#[must_use]
pub fn iptables_forwarding(network: Ipv4Net) -> String {
    format!(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :KUBE-FORWARD - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n\
         :KUBE-FIREWALL - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n\
         :FLANNEL-FWD - [0:0]\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A INPUT -j KUBE-FIREWALL\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -j KUBE-FIREWALL\n\
         -A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         -A FLANNEL-FWD -s {network} -m comment --comment \"flanneld forward\" -j ACCEPT\n\
         -A FLANNEL-FWD -d {network} -m comment --comment \"flanneld forward\" -j ACCEPT\n\
         COMMIT\n"
    )
}

/// What kube-proxy's partial sync restores (`iptables-restore --noflush`) after service
/// `changed` changed: `KUBE-SERVICES` in full and the changed service's own chains.
#[must_use]
pub fn iptables_update(services: &[BenchService], changed: usize, cidr: Ipv4Net) -> String {
    let mut out = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    iptables_declare(&mut out, changed, &services[changed]);
    iptables_services_chain(&mut out, services);
    iptables_service(&mut out, changed, &services[changed], cidr);
    out.push_str("COMMIT\n");
    out
}

/// The name of the nftables table kube-proxy's nftables mode owns.
pub const NFT_TABLE: &str = "kube-proxy";

fn nft_service(out: &mut String, index: usize, service: &BenchService, cidr: Ipv4Net) {
    let svc = format!(
        "service-{index}-bench/{}/tcp/http",
        BenchService::name(index)
    );
    let _ = writeln!(out, "add chain ip {NFT_TABLE} {svc}");
    let _ = writeln!(
        out,
        "add rule ip {NFT_TABLE} {svc} ip daddr {} tcp dport {} ip saddr != {cidr} jump mark-for-masquerade",
        service.vip, service.port
    );
    let mut vmap = Vec::new();
    for (e, endpoint) in service.endpoints.iter().enumerate() {
        let chain = format!(
            "endpoint-{index}-{e}-bench/{}/tcp/http__{endpoint}/{}",
            BenchService::name(index),
            service.target_port
        );
        let _ = writeln!(out, "add chain ip {NFT_TABLE} {chain}");
        let _ = writeln!(
            out,
            "add rule ip {NFT_TABLE} {chain} ip saddr {endpoint} jump mark-for-masquerade"
        );
        let _ = writeln!(
            out,
            "add rule ip {NFT_TABLE} {chain} meta l4proto tcp dnat to {endpoint}:{}",
            service.target_port
        );
        vmap.push(format!("{e} : goto {chain}"));
    }
    let _ = writeln!(
        out,
        "add rule ip {NFT_TABLE} {svc} numgen random mod {} vmap {{ {} }}",
        service.endpoints.len(),
        vmap.join(", ")
    );
    let _ = writeln!(
        out,
        "add element ip {NFT_TABLE} service-ips {{ {} . tcp . {} : goto {svc} }}",
        service.vip, service.port
    );
}

/// kube-proxy's nftables table for `services`: a verdict map from (IP, protocol, port) to a
/// chain per service, which picks an endpoint chain with `numgen random mod N vmap`.
#[must_use]
pub fn nft_ruleset(services: &[BenchService], cidr: Ipv4Net) -> String {
    let mut out = format!(
        "add table ip {NFT_TABLE}\n\
         add map ip {NFT_TABLE} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}\n\
         add chain ip {NFT_TABLE} nat-prerouting {{ type nat hook prerouting priority dstnat ; }}\n\
         add chain ip {NFT_TABLE} nat-output {{ type nat hook output priority -100 ; }}\n\
         add chain ip {NFT_TABLE} nat-postrouting {{ type nat hook postrouting priority srcnat ; }}\n\
         add chain ip {NFT_TABLE} services\n\
         add chain ip {NFT_TABLE} masquerading\n\
         add chain ip {NFT_TABLE} mark-for-masquerade\n\
         add rule ip {NFT_TABLE} nat-prerouting jump services\n\
         add rule ip {NFT_TABLE} nat-output jump services\n\
         add rule ip {NFT_TABLE} nat-postrouting jump masquerading\n\
         add rule ip {NFT_TABLE} masquerading meta mark & 0x4000 == 0 return\n\
         add rule ip {NFT_TABLE} masquerading meta mark set meta mark ^ 0x4000\n\
         add rule ip {NFT_TABLE} masquerading masquerade fully-random\n\
         add rule ip {NFT_TABLE} mark-for-masquerade meta mark set meta mark | 0x4000\n\
         add rule ip {NFT_TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips\n"
    );
    for (i, service) in services.iter().enumerate() {
        nft_service(&mut out, i, service, cidr);
    }
    out
}

/// What kube-proxy's nftables mode sends after service `changed` changed: that service's chains
/// flushed and rewritten, in one transaction.
#[must_use]
pub fn nft_update(services: &[BenchService], changed: usize, cidr: Ipv4Net) -> String {
    let service = &services[changed];
    let mut out = format!(
        "delete element ip {NFT_TABLE} service-ips {{ {} . tcp . {} }}\n",
        service.vip, service.port
    );
    let svc = format!(
        "service-{changed}-bench/{}/tcp/http",
        BenchService::name(changed)
    );
    let _ = writeln!(out, "flush chain ip {NFT_TABLE} {svc}");
    for (e, endpoint) in service.endpoints.iter().enumerate() {
        let _ = writeln!(
            out,
            "flush chain ip {NFT_TABLE} endpoint-{changed}-{e}-bench/{}/tcp/http__{endpoint}/{}",
            BenchService::name(changed),
            service.target_port
        );
    }
    nft_service(&mut out, changed, service, cidr);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> Vec<BenchService> {
        services(
            2,
            &[Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)],
            8080,
        )
    }

    #[test]
    fn iptables_picks_endpoints_with_kube_proxys_falling_probabilities() {
        let rules = iptables_ruleset(&two(), "10.0.0.0/16".parse().unwrap());
        assert!(rules.contains(
            "-A KUBE-SERVICES -d 10.96.0.2/32 -p tcp -m comment --comment \"bench/svc-1:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-0000000000000001"
        ));
        assert!(rules.contains(
            "-A KUBE-SVC-0000000000000000 -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-0000000000000000\n\
             -A KUBE-SVC-0000000000000000 -j KUBE-SEP-0000000000000001\n"
        ));
        assert!(rules.contains(
            "-A KUBE-SEP-0000000000010001 -p tcp -m tcp -j DNAT --to-destination 10.0.0.3:8080"
        ));
        assert!(rules.ends_with("COMMIT\n"));
    }

    #[test]
    fn updates_rewrite_only_the_changed_service_and_the_dispatch() {
        let cidr = "10.0.0.0/16".parse().unwrap();
        let update = iptables_update(&two(), 1, cidr);
        assert!(update.contains(":KUBE-SVC-0000000000000001 - [0:0]"));
        assert!(!update.contains("KUBE-SVC-0000000000000000 -"));
        assert_eq!(update.matches("-A KUBE-SERVICES").count(), 2);
        let nft = nft_update(&two(), 0, cidr);
        assert!(nft.contains("flush chain ip kube-proxy service-0-bench/svc-0/tcp/http"));
        assert!(!nft.contains("svc-1"));
        assert!(nft_ruleset(&two(), cidr).contains(
            "numgen random mod 2 vmap { 0 : goto endpoint-1-0-bench/svc-1/tcp/http__10.0.0.2/8080, \
             1 : goto endpoint-1-1-bench/svc-1/tcp/http__10.0.0.3/8080 }"
        ));
    }
}
