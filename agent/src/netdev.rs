//! The node's links: the pod bridge (created when missing, as the CNI bridge plugin would) and
//! a feed of its ports appearing and leaving, so reverse NAT follows the pods.

use std::{io, net::IpAddr};

use futures::{StreamExt as _, TryStreamExt as _, channel::mpsc::UnboundedReceiver};
use ipnet::Ipv4Net;
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkUnspec, MulticastGroup, new_connection,
    new_multicast_connection,
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{
        RouteNetlinkMessage,
        link::{LinkAttribute, LinkMessage},
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
    #[error("cannot enable IPv4 forwarding (/proc/sys/net/ipv4/ip_forward)")]
    Forwarding(#[source] io::Error),
}

/// A link in the node's network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The bridge (or bond) it is enslaved to.
    pub controller: Option<u32>,
}

impl Link {
    fn from_message(message: &LinkMessage) -> Option<Self> {
        let mut name = None;
        let mut controller = None;
        for attribute in &message.attributes {
            match attribute {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::Controller(c) => controller = Some(*c),
                _ => {}
            }
        }
        Some(Self {
            index: message.header.index,
            name: name?,
            controller,
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
    let messages: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("list links"))?;
    Ok(messages.iter().filter_map(Link::from_message).collect())
}

/// Returns the pod bridge, creating it with the subnet's first address when it is missing (a
/// bridge the CNI plugin already made is left as it is), and brings it up.
pub async fn ensure_bridge(
    handle: &Handle,
    name: &str,
    subnet: Ipv4Net,
) -> Result<(Link, bool), NetdevError> {
    let created = if link_by_name(handle, name).await?.is_none() {
        handle
            .link()
            .add(LinkBridge::new(name).build())
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
    if created {
        let gateway = subnet.hosts().next().unwrap_or(subnet.addr());
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
pub fn enable_ip_forwarding() -> Result<(), NetdevError> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(NetdevError::Forwarding)
}

/// A change to the set of ports of one bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortEvent {
    Joined(Link),
    Left(u32),
}

/// Link notifications, turned into port events for one bridge.
pub struct PortWatch {
    bridge: u32,
    messages: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
}

impl PortWatch {
    /// Subscribes to link notifications. Subscribe before listing the current ports, so no
    /// port can join unseen in between.
    pub fn subscribe(bridge: u32) -> Result<Self, NetdevError> {
        let (connection, _, messages) =
            new_multicast_connection(&[MulticastGroup::Link]).map_err(NetdevError::Socket)?;
        tokio::spawn(connection);
        Ok(Self { bridge, messages })
    }

    /// The next change; `None` when the netlink socket closed.
    pub async fn next(&mut self) -> Option<PortEvent> {
        loop {
            let (message, _) = self.messages.next().await?;
            let NetlinkPayload::InnerMessage(message) = message.payload else {
                continue;
            };
            match message {
                RouteNetlinkMessage::NewLink(link) => {
                    let Some(link) = Link::from_message(&link) else {
                        continue;
                    };
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
                _ => {}
            }
        }
    }
}
