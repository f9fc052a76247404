//! The namespace test `cargo xtask vm-test` runs on every kernel of the matrix (and
//! `cargo test` runs on this one): two nodes with a pod each, a ClusterIP whose endpoint is the
//! other node's pod, so one VXLAN hop, over TCP and UDP, and the direct pod-to-pod path (a
//! request, and 8 MiB in bulk, so segmentation offload meets the encapsulation). It is
//! small on purpose: under QEMU without KVM a guest runs about 20 times slower. It also checks
//! the fallbacks the agent chose for this kernel: how TC programs attach, and how a node's
//! `connect()` to a service without endpoints fails.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::Duration,
};

use weft_tests::{
    apps::{http_get, receive_bulk, send_bulk, udp_request},
    overlay::{POD_HTTP_PORT, POD_UDP_PORT, cluster},
    seed::{endpoint_slice, service},
    within,
};

#[test]
fn a_cluster_ip_reaches_a_pod_on_another_node_over_tcp_and_udp() {
    let cluster = cluster(2, 1);
    let client = &cluster.pods[0][0];
    let backend = cluster.pods[1][0].addr;
    let (web, echo, empty) = (
        Ipv4Addr::new(10, 254, 7, 7),
        Ipv4Addr::new(10, 254, 7, 8),
        Ipv4Addr::new(10, 254, 7, 9),
    );
    let manifest = format!(
        "{}---\n{}---\n{}---\n{}",
        service("web", web, 80, "TCP", POD_HTTP_PORT),
        endpoint_slice("web", "TCP", POD_HTTP_PORT, &[backend]),
        service("echo", echo, 53, "UDP", POD_UDP_PORT),
        endpoint_slice("echo", "UDP", POD_UDP_PORT, &[backend]),
    ) + "---\n"
        + &service("empty", empty, 80, "TCP", POD_HTTP_PORT);
    cluster.agents[0].write_manifest("smoke.yaml", &manifest);

    // The direct path first: pod to pod over VXLAN, addresses unchanged.
    let direct = client
        .ns
        .run(|| http_get(SocketAddrV4::new(backend, POD_HTTP_PORT)))
        .expect("pod to pod across nodes");
    assert_eq!(direct.server, backend);
    assert_eq!(*direct.client_seen.ip(), client.addr);
    // Enough bytes for segmentation offload to hand the encapsulating program large packets:
    // kernels before 5.12 encapsulate them without the L2_ETH flag and must still segment them.
    const BULK: u64 = 8 << 20;
    let receiving = receive_bulk(&cluster.pods[1][0].ns, 9000);
    let sent = client
        .ns
        .run(|| send_bulk(SocketAddrV4::new(backend, 9000), BULK))
        .expect("sending in bulk");
    let (received, digest) = receiving.join().expect("receiver").expect("receiving");
    assert_eq!(
        (received, digest),
        (BULK, sent),
        "the bytes arrived unchanged"
    );

    let tcp_vip = SocketAddrV4::new(web, 80);
    within(
        Duration::from_secs(30),
        "node 1 serves the ClusterIP",
        || client.ns.run(|| http_get(tcp_vip)).is_ok(),
    );
    for _ in 0..5 {
        let answer = client
            .ns
            .run(|| http_get(tcp_vip))
            .expect("TCP to the ClusterIP");
        assert_eq!(answer.server, backend, "DNAT to the only endpoint");
        assert_eq!(
            *answer.client_seen.ip(),
            client.addr,
            "no masquerade for a pod client"
        );
    }
    let (answer, from) = client
        .ns
        .run(|| udp_request(SocketAddrV4::new(echo, 53)))
        .expect("UDP to the ClusterIP");
    assert_eq!(answer.server, backend);
    assert_eq!(
        from,
        SocketAddrV4::new(echo, 53).into(),
        "the reply is reverse-NATed to the ClusterIP"
    );
    let drops = cluster.agents[0].inspect("drops");
    assert!(drops.lines().skip(1).all(|l| l.ends_with(" 0")), "{drops}");

    // What this kernel offers, and what the agent said it would do about it.
    let kernel = kernel_series();
    let features = cluster.agents[0]
        .log()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line.pointer("/fields/message") == Some(&"kernel features".into()))
        .expect("the agent logs the kernel features it uses");
    let tc_attach = if kernel >= (6, 6) { "Tcx" } else { "Netlink" };
    assert_eq!(features["fields"]["tc_attach"], tc_attach, "{features}");
    let refused = cluster.nodes[0].ns.run(|| {
        TcpStream::connect_timeout(&SocketAddrV4::new(empty, 80).into(), Duration::from_secs(5))
    });
    let expected = if kernel >= (5, 18) {
        io::ErrorKind::ConnectionRefused
    } else {
        io::ErrorKind::PermissionDenied
    };
    assert_eq!(
        refused.expect_err("a service without endpoints").kind(),
        expected,
        "a node's connect() to a service without endpoints on Linux {kernel:?}"
    );
}

/// The running kernel's (major, minor).
fn kernel_series() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse().expect("a kernel release starts with numbers"));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
}
