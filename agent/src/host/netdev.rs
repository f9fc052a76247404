//! The node's links, addresses and routes: the pod bridge (created when missing, as the CNI
//! bridge plugin would), a feed of its ports appearing and leaving (so service translation
//! follows the pods) and of the node's addresses changing (so NodePorts follow them), the
//! uplink, and the one route that sends the pod Network into the overlay.

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv4Addr},
};

use futures::{StreamExt as _, TryStreamExt as _, channel::mpsc::UnboundedReceiver};
use ipnet::Ipv4Net;
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVxlan, MulticastGroup,
    RouteMessageBuilder, new_connection, new_multicast_connection,
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{
        RouteNetlinkMessage,
        address::AddressAttribute,
        link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage},
        neighbour::NeighbourState,
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteProtocol},
    },
    sys::SocketAddr,
};

#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    #[error("cannot open a netlink socket")]
    Socket(#[source] io::Error),
    #[error("netlink request to {what} failed")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error(
        "IPv4 forwarding is off and cannot be switched on (/proc/sys/net/ipv4/ip_forward); \
         set net.ipv4.ip_forward=1 on the node"
    )]
    Forwarding(#[source] io::Error),
    #[error("no interface {0}; pass the uplink with --iface")]
    NoSuchLink(String),
    #[error("no default route to pick the uplink from; pass it with --iface")]
    NoDefaultRoute,
    #[error("{0} has no IPv4 address to use as this node's PublicIP; pass --public-ip")]
    NoAddress(String),
    #[error(
        "bridge {name} has {addresses:?}, none in this node's pod subnet {subnet}: it was made \
         for another subnet (an earlier lease, lost while the node was down and taken by \
         another node, or another network config). Delete the bridge (`ip link delete {name}`) \
         and recreate this node's pods; the node keeps {subnet}"
    )]
    BridgeOfAnotherSubnet {
        name: String,
        addresses: Vec<Ipv4Addr>,
        subnet: Ipv4Net,
    },
}

/// A link in the node's network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The bridge (or bond) it is enslaved to.
    pub controller: Option<u32>,
    /// Its MAC (all-zero for a link without one).
    pub mac: [u8; 6],
    /// Whether it is a veth (a pod's port, whose peer is in the pod's namespace).
    pub veth: bool,
    /// The id this namespace gives the namespace of its peer (a veth's), if elsewhere.
    pub peer_netns: Option<i32>,
}

impl Link {
    fn from_message(message: &LinkMessage) -> Option<Self> {
        let mut name = None;
        let mut controller = None;
        let mut mac = [0u8; 6];
        let mut veth = false;
        let mut peer_netns = None;
        for attribute in &message.attributes {
            match attribute {
                LinkAttribute::LinkNetNsId(id) => peer_netns = Some(*id),
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::Controller(c) => controller = Some(*c),
                LinkAttribute::Address(bytes) if bytes.len() == 6 => mac.copy_from_slice(bytes),
                LinkAttribute::LinkInfo(infos) => {
                    veth = infos.contains(&LinkInfo::Kind(InfoKind::Veth));
                }
                _ => {}
            }
        }
        Some(Self {
            index: message.header.index,
            name: name?,
            controller,
            mac,
            veth,
            peer_netns,
        })
    }
}

/// A netlink route socket for requests.
pub fn connect() -> Result<Handle, NetdevError> {
    let (connection, handle, _) = new_connection().map_err(NetdevError::Socket)?;
    tokio::spawn(connection);
    Ok(handle)
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetdevError {
    let what = what.into();
    move |source| NetdevError::Netlink { what, source }
}

/// Collects a dump, asking again while the kernel answers EBUSY: it runs one dump per socket
/// at a time, and the agent's tasks share one socket, so listings made at once meet it.
async fn dump<S>(request: impl Fn() -> S) -> Result<Vec<S::Ok>, rtnetlink::Error>
where
    S: futures::TryStream<Error = rtnetlink::Error>,
{
    let mut busy = 0;
    loop {
        match request().try_collect().await {
            Err(rtnetlink::Error::NetlinkError(e))
                if e.raw_code() == -libc::EBUSY && busy < 100 =>
            {
                busy += 1;
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            outcome => return outcome,
        }
    }
}

/// The link called `name`, if there is one.
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<Link>, NetdevError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(message) => Ok(message.as_ref().and_then(Link::from_message)),
        // The kernel answers ENODEV for a name it does not know.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(netlink(format!("look up {name}"))(e)),
    }
}

/// Every link of the namespace.
pub async fn links(handle: &Handle) -> Result<Vec<Link>, NetdevError> {
    let messages: Vec<LinkMessage> = dump(|| handle.link().get().execute())
        .await
        .map_err(netlink("list links"))?;
    Ok(messages.iter().filter_map(Link::from_message).collect())
}

/// Returns the pod bridge, creating it (with `mtu`, when given) when it is missing, gives it the
/// subnet's first address (the pods' gateway) when it lacks it, and brings it up. A bridge the
/// CNI plugin already made is otherwise left as it is; one addressed only for another subnet is
/// an error ([`bridge_fits`]).
pub async fn ensure_bridge(
    handle: &Handle,
    name: &str,
    subnet: Ipv4Net,
    mtu: Option<u32>,
) -> Result<(Link, bool), NetdevError> {
    let created = if link_by_name(handle, name).await?.is_none() {
        let mut bridge = LinkBridge::new(name);
        if let Some(mtu) = mtu {
            bridge = bridge.mtu(mtu);
        }
        handle
            .link()
            .add(bridge.build())
            .execute()
            .await
            .map_err(netlink(format!("create bridge {name}")))?;
        true
    } else {
        false
    };
    let bridge = link_by_name(handle, name)
        .await?
        .ok_or_else(|| NetdevError::Socket(io::Error::other(format!("bridge {name} vanished"))))?;
    let gateway = subnet.hosts().next().unwrap_or(subnet.addr());
    let addresses = link_addresses(handle, bridge.index, name).await?;
    bridge_fits(name, &addresses, subnet)?;
    if !addresses.contains(&gateway) {
        handle
            .address()
            .add(bridge.index, IpAddr::V4(gateway), subnet.prefix_len())
            .execute()
            .await
            .map_err(netlink(format!("address {name}")))?;
    }
    handle
        .link()
        .set(LinkUnspec::new_with_index(bridge.index).up().build())
        .execute()
        .await
        .map_err(netlink(format!("bring up {name}")))?;
    Ok((bridge, created))
}

/// The interface the overlay runs over, and what the overlay needs to know of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Its first IPv4 address (flannel's default PublicIP).
    pub address: Option<Ipv4Addr>,
}

/// The uplink called `name`, or the interface of the default route when `name` is `None`
/// (flannel's choice when `--iface` is not given).
pub async fn uplink(handle: &Handle, name: Option<&str>) -> Result<Uplink, NetdevError> {
    let message = match name {
        Some(name) => {
            let mut links = handle.link().get().match_name(name.to_owned()).execute();
            match links.try_next().await {
                Ok(Some(message)) => message,
                Ok(None) => return Err(NetdevError::NoSuchLink(name.to_owned())),
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                    return Err(NetdevError::NoSuchLink(name.to_owned()));
                }
                Err(e) => return Err(netlink(format!("look up {name}"))(e)),
            }
        }
        None => {
            let index = default_route_interface(handle).await?;
            let mut links = handle.link().get().match_index(index).execute();
            links
                .try_next()
                .await
                .map_err(netlink("look up the default route's interface"))?
                .ok_or(NetdevError::NoDefaultRoute)?
        }
    };
    let link = Link::from_message(&message).ok_or(NetdevError::NoDefaultRoute)?;
    let mut mac = [0u8; 6];
    let mut mtu = 1500;
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::Address(bytes) if bytes.len() == 6 => mac.copy_from_slice(bytes),
            LinkAttribute::Mtu(value) => mtu = *value,
            _ => {}
        }
    }
    let address = link_addresses(handle, link.index, &link.name)
        .await?
        .into_iter()
        .next();
    Ok(Uplink {
        index: link.index,
        name: link.name,
        mac,
        mtu,
        address,
    })
}

/// The addresses of the bridge `name`, if there is one (link-local ones aside).
pub async fn bridge_addresses(handle: &Handle, name: &str) -> Result<Vec<Ipv4Addr>, NetdevError> {
    match link_by_name(handle, name).await? {
        Some(bridge) => link_addresses(handle, bridge.index, name).await,
        None => Ok(Vec::new()),
    }
}

/// Whether the bridge `name` with `addresses` can serve the pod subnet `subnet`: it can when it
/// has no address yet or one inside the subnet; one addressed only for other subnets holds pods
/// of another subnet, which this node cannot route.
pub fn bridge_fits(name: &str, addresses: &[Ipv4Addr], subnet: Ipv4Net) -> Result<(), NetdevError> {
    if addresses.is_empty() || addresses.iter().any(|address| subnet.contains(address)) {
        return Ok(());
    }
    Err(NetdevError::BridgeOfAnotherSubnet {
        name: name.to_owned(),
        addresses: addresses.to_vec(),
        subnet,
    })
}

/// The IPv4 addresses of link `index` (`name`, for errors), link-local ones aside, in the
/// kernel's order.
async fn link_addresses(
    handle: &Handle,
    index: u32,
    name: &str,
) -> Result<Vec<Ipv4Addr>, NetdevError> {
    let messages = dump(|| {
        handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
    })
    .await
    .map_err(netlink(format!("list addresses of {name}")))?;
    let mut addresses: Vec<Ipv4Addr> = Vec::new();
    for attribute in messages.iter().flat_map(|message| &message.attributes) {
        if let AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) =
            attribute
            && !ip.is_link_local()
            && !addresses.contains(ip)
        {
            addresses.push(*ip);
        }
    }
    Ok(addresses)
}

/// The node's IPv4 addresses inside `only` (every address when it is empty), loopback aside:
/// where NodePorts are served, as kube-proxy's `--nodeport-addresses`.
pub async fn node_addresses(
    handle: &Handle,
    only: &[Ipv4Net],
) -> Result<BTreeSet<Ipv4Addr>, NetdevError> {
    let messages = dump(|| handle.address().get().execute())
        .await
        .map_err(netlink("list addresses"))?;
    Ok(messages
        .iter()
        .flat_map(|message| &message.attributes)
        .filter_map(|attribute| match attribute {
            AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) => {
                Some(*ip)
            }
            _ => None,
        })
        .filter(|ip| !ip.is_loopback())
        .filter(|ip| only.is_empty() || only.iter().any(|net| net.contains(ip)))
        .collect())
}

/// Every IPv4 route of the namespace, all tables.
pub async fn routes(handle: &Handle) -> Result<Vec<RouteMessage>, NetdevError> {
    dump(|| {
        handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
    })
    .await
    .map_err(netlink("list routes"))
}

/// Every neighbour entry of the namespace.
pub async fn neighbours(
    handle: &Handle,
) -> Result<Vec<rtnetlink::packet_route::neighbour::NeighbourMessage>, NetdevError> {
    dump(|| handle.neighbours().get().execute())
        .await
        .map_err(netlink("list neighbours"))
}

async fn default_route_interface(handle: &Handle) -> Result<u32, NetdevError> {
    let routes = routes(handle).await?;
    routes
        .iter()
        .filter(|route| route.header.destination_prefix_length == 0)
        .find_map(|route| {
            route
                .attributes
                .iter()
                .find_map(|attribute| match attribute {
                    RouteAttribute::Oif(index) => Some(*index),
                    _ => None,
                })
        })
        .ok_or(NetdevError::NoDefaultRoute)
}

/// The routing protocol number weft's routes carry (`ip route show proto 119`), so that
/// `weft cleanup` finds them without any state of the agent's.
pub const ROUTE_PROTOCOL: u8 = b'w';

/// The route that sends the whole pod `network` out of the uplink, where `tc_to_uplink`
/// encapsulates it: `<network> via <network address> dev <uplink> onlink src <gateway> mtu
/// <mtu>`, with a permanent neighbour entry for that next hop. One route and one neighbour for
/// any number of nodes: which node a packet goes to is the datapath's LPM lookup, not a route.
/// `src` makes the node's own traffic to pods leave from its pod gateway address, as flannel's
/// `flannel.1` address does; `mtu` leaves room for the encapsulation.
pub async fn route_network(
    handle: &Handle,
    network: Ipv4Net,
    uplink: &Uplink,
    gateway: Ipv4Addr,
    next_hop_mac: [u8; 6],
    mtu: u32,
) -> Result<(), NetdevError> {
    let next_hop = network.network();
    handle
        .neighbours()
        .add(uplink.index, IpAddr::V4(next_hop))
        .link_layer_address(&next_hop_mac)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(netlink(format!(
            "add the overlay next hop {next_hop} on {}",
            uplink.name
        )))?;
    let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(network.network(), network.prefix_len())
        .gateway(next_hop)
        .output_interface(uplink.index)
        .pref_source(gateway)
        .onlink()
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
        .build();
    route
        .attributes
        .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(netlink(format!("route {network} into the overlay")))
}

/// The routes [`route_network`] added in this namespace: (network, uplink ifindex).
pub async fn weft_routes(handle: &Handle) -> Result<Vec<(Ipv4Net, u32)>, NetdevError> {
    let mut ours = Vec::new();
    for route in routes(handle).await? {
        if route.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
            continue;
        }
        let destination = route
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                RouteAttribute::Destination(RouteAddress::Inet(address)) => Some(*address),
                _ => None,
            });
        let interface = route
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                RouteAttribute::Oif(index) => Some(*index),
                _ => None,
            });
        if let (Some(destination), Some(interface)) = (destination, interface)
            && let Ok(network) = Ipv4Net::new(destination, route.header.destination_prefix_length)
        {
            ours.push((network, interface));
        }
    }
    Ok(ours)
}

/// Removes what [`route_network`] added; what is already gone is no error.
pub async fn unroute_network(
    handle: &Handle,
    network: Ipv4Net,
    uplink: u32,
) -> Result<(), NetdevError> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(network.network(), network.prefix_len())
        .output_interface(uplink)
        .build();
    match handle.route().del(route).execute().await {
        Ok(()) => {}
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => {}
        Err(e) => return Err(netlink(format!("remove the route to {network}"))(e)),
    }
    for neighbour in neighbours(handle).await? {
        let next_hop = neighbour.attributes.iter().any(|attribute| {
            matches!(attribute, rtnetlink::packet_route::neighbour::NeighbourAttribute::Destination(
                rtnetlink::packet_route::neighbour::NeighbourAddress::Inet(ip)) if *ip == network.network())
        });
        if next_hop && neighbour.header.ifindex == uplink {
            handle
                .neighbours()
                .del(neighbour)
                .execute()
                .await
                .map_err(netlink(format!(
                    "remove the overlay next hop on interface {uplink}"
                )))?;
        }
    }
    Ok(())
}

/// The node's `external` (collect_md) VXLAN device: the kernel's receive path for the overlay's
/// port beside weft's own decapsulation. Its UDP socket makes the kernel aggregate the tunnel's
/// traffic in GRO (a NIC delivers it frame by frame otherwise) and lets NICs learn the port for
/// their tunnel offloads; what weft hands on (a GSO aggregate it cannot decapsulate safely,
/// reassembled fragments) it decapsulates as flannel's `flannel.1` would.
pub const TUNNEL_DEVICE: &str = "weft-vxlan";

/// Creates [`TUNNEL_DEVICE`] for the overlay's `port` (or keeps the one there when it is such
/// a device), with the VtepMAC (what senders address inner frames to) and the pod routes' MTU,
/// and brings it up. Reverse-path filtering is turned off on it: what it decapsulates comes
/// from pods whose route is the uplink's.
pub async fn ensure_tunnel_device(
    handle: &Handle,
    port: u16,
    vtep_mac: [u8; 6],
    mtu: u32,
) -> Result<Link, NetdevError> {
    let mut existing = handle
        .link()
        .get()
        .match_name(TUNNEL_DEVICE.to_owned())
        .execute();
    let found = match existing.try_next().await {
        Ok(message) => message,
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => None,
        Err(e) => return Err(netlink(format!("look up {TUNNEL_DEVICE}"))(e)),
    };
    if !found.is_some_and(|message| is_external_vxlan(&message, port)) {
        // Missing, or another kind of device under the name: made anew.
        remove_tunnel_device(handle).await?;
        let device = LinkMessageBuilder::<LinkVxlan>::new(TUNNEL_DEVICE)
            .collect_metadata(true)
            .port(port)
            .learning(false)
            .build();
        handle
            .link()
            .add(device)
            .execute()
            .await
            .map_err(netlink(format!("create {TUNNEL_DEVICE} (VXLAN, external)")))?;
    }
    let link = link_by_name(handle, TUNNEL_DEVICE)
        .await?
        .ok_or_else(|| NetdevError::NoSuchLink(TUNNEL_DEVICE.to_owned()))?;
    loosen_reverse_path_filter();
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(link.index)
                .address(vtep_mac.to_vec())
                .mtu(mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(netlink(format!(
            "bring up {TUNNEL_DEVICE} (another VXLAN device, such as flannel.1, may hold UDP \
             port {port})"
        )))?;
    Ok(link)
}

/// What the VXLAN device decapsulates arrives on it from pods whose route is the uplink's, so a
/// strict reverse-path filter would drop it: the device's own setting is turned off where it is
/// strict (best effort: a container's `/proc/sys` may be read-only). The kernel applies the
/// stricter of the device's and `all`'s, so a node with `all` strict is told what that costs.
fn loosen_reverse_path_filter() {
    let read = |path: &str| std::fs::read_to_string(path).map(|v| v.trim().to_owned());
    let device = format!("/proc/sys/net/ipv4/conf/{TUNNEL_DEVICE}/rp_filter");
    if read(&device).is_ok_and(|value| value == "1")
        && let Err(e) = std::fs::write(&device, "0")
    {
        tracing::warn!("cannot turn off the strict reverse-path filter on {TUNNEL_DEVICE} ({e})");
    }
    if read("/proc/sys/net/ipv4/conf/all/rp_filter").is_ok_and(|value| value == "1") {
        tracing::warn!(
            "net.ipv4.conf.all.rp_filter is 1 (strict): what {TUNNEL_DEVICE} decapsulates for \
             the kernel (GSO aggregates weft cannot decapsulate itself on kernels before \
             BPF_F_ADJ_ROOM_DECAP_L4_UDP) is dropped; set it to 2 (loose) or 0"
        );
    }
}

/// Whether a link is a VXLAN device in `external` mode on `port`.
fn is_external_vxlan(message: &LinkMessage, port: u16) -> bool {
    message.attributes.iter().any(|attribute| {
        let LinkAttribute::LinkInfo(infos) = attribute else {
            return false;
        };
        infos.iter().any(|info| {
            let LinkInfo::Data(InfoData::Vxlan(vxlan)) = info else {
                return false;
            };
            vxlan.contains(&InfoVxlan::CollectMetadata(true))
                && vxlan.contains(&InfoVxlan::Port(port))
        })
    })
}

/// Removes [`TUNNEL_DEVICE`]; none there is no error.
pub async fn remove_tunnel_device(handle: &Handle) -> Result<(), NetdevError> {
    let Some(link) = link_by_name(handle, TUNNEL_DEVICE).await? else {
        return Ok(());
    };
    match handle.link().del(link.index).execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
        Err(e) => Err(netlink(format!("remove {TUNNEL_DEVICE}"))(e)),
    }
}

/// Lets a bridge port send frames back out the way they came (`hairpin_mode`), as flannel's CNI
/// configuration (`hairpinMode: true`) and kubelet's `--hairpin-mode=hairpin-veth` do. With
/// `br_netfilter`, the reply of a pod that reached itself through its own service is switched
/// straight back to the port it arrived on once its masquerade is undone, and without hairpin
/// mode the bridge drops it.
pub async fn set_hairpin(handle: &Handle, port: &Link) -> Result<(), NetdevError> {
    handle
        .link()
        .set_port(LinkBridgePort::new(port.index).hairpin(true).build())
        .execute()
        .await
        .map_err(netlink(format!("set hairpin mode on {}", port.name)))
}

/// Lets the node route pod traffic (what the CNI bridge plugin or Docker normally switch on).
/// Writes only when forwarding is off: a container's `/proc/sys` is read-only, and on a node
/// that already forwards there is nothing to change.
pub fn enable_ip_forwarding() -> Result<(), NetdevError> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    let current = std::fs::read_to_string(PATH).map_err(NetdevError::Forwarding)?;
    if current.trim() == "1" {
        return Ok(());
    }
    std::fs::write(PATH, "1").map_err(NetdevError::Forwarding)
}

/// A change to the set of ports of one bridge, or to the node's addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortEvent {
    Joined(Link),
    Left(u32),
    /// An IPv4 address was added or removed somewhere on the node.
    AddressesChanged,
    /// Notifications were lost (the socket overran): list the ports and addresses again.
    Resync,
    /// The bridge was made (a CNI plugin makes it with the node's first pod): list its ports.
    BridgeMade,
}

/// Link and address notifications, turned into port events for one bridge.
pub struct PortWatch {
    bridge_name: String,
    /// The bridge's index; 0 while there is none.
    bridge: u32,
    messages: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
}

impl PortWatch {
    /// Subscribes to link and address notifications. Subscribe before listing the current
    /// ports and addresses, so no change can happen unseen in between.
    pub fn subscribe(bridge_name: &str) -> Result<Self, NetdevError> {
        let (connection, _, messages) =
            new_multicast_connection(&[MulticastGroup::Link, MulticastGroup::Ipv4Ifaddr])
                .map_err(NetdevError::Socket)?;
        tokio::spawn(connection);
        Ok(Self {
            bridge_name: bridge_name.to_owned(),
            bridge: 0,
            messages,
        })
    }

    /// Follows the bridge with this index (found, made, or deleted and made again).
    pub fn set_bridge(&mut self, bridge: u32) {
        self.bridge = bridge;
    }

    /// The next change; `None` when the netlink socket closed.
    pub async fn next(&mut self) -> Option<PortEvent> {
        loop {
            let (message, _) = self.messages.next().await?;
            let message = match message.payload {
                NetlinkPayload::InnerMessage(message) => message,
                NetlinkPayload::Overrun(_) => return Some(PortEvent::Resync),
                _ => continue,
            };
            match message {
                RouteNetlinkMessage::NewLink(link) => {
                    let Some(link) = Link::from_message(&link) else {
                        continue;
                    };
                    if link.name == self.bridge_name && link.index != self.bridge {
                        self.bridge = link.index;
                        return Some(PortEvent::BridgeMade);
                    }
                    // A link that left the bridge is reported as a NewLink without it.
                    return Some(if link.controller == Some(self.bridge) {
                        PortEvent::Joined(link)
                    } else {
                        PortEvent::Left(link.index)
                    });
                }
                RouteNetlinkMessage::DelLink(link) => {
                    return Some(PortEvent::Left(link.header.index));
                }
                RouteNetlinkMessage::NewAddress(_) | RouteNetlinkMessage::DelAddress(_) => {
                    return Some(PortEvent::AddressesChanged);
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's tasks share one netlink socket, on which the kernel runs one dump at a
    /// time: listings made at once must all come back, not fail with EBUSY.
    #[tokio::test]
    async fn listings_at_once_on_one_socket_all_succeed() {
        let handle = connect().expect("a netlink socket");
        let listings = (0..16).map(|n| {
            let handle = handle.clone();
            async move {
                if n % 2 == 0 {
                    links(&handle).await.map(|links| links.len())
                } else {
                    node_addresses(&handle, &[])
                        .await
                        .map(|addresses| addresses.len())
                }
            }
        });
        for outcome in futures::future::join_all(listings).await {
            outcome.expect("a listing");
        }
    }
}
