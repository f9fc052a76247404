//! The next hop towards each overlay member, from the node's main routing table and its
//! neighbour table: what the datapath addresses encapsulated packets to without a FIB lookup
//! per packet (measured: that lookup was a third of an encapsulation's cost). A source like
//! the others: it follows routes and neighbours as they change (netlink notifications, taken
//! together over a short pause) and the members as leases come and go, and hands the model the
//! whole map each time. A member whose next hop is not known (not resolved yet, or reached
//! through another device than the uplink) is left to the datapath's FIB lookup, whose
//! `bpf_redirect_neigh` makes the kernel resolve it; the neighbour entry that appears then is
//! picked up here.

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    net::Ipv4Addr,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use futures::StreamExt as _;
use ipnet::Ipv4Net;
use rtnetlink::{
    Handle, MulticastGroup, new_multicast_connection,
    packet_route::{
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
    },
};
use tracing::warn;

use crate::{
    host::netdev::{self, NetdevError},
    model::NextHop,
    sources::ModelHandle,
};

/// A route of the main table, as far as the next hop goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub destination: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: u32,
    pub priority: u32,
}

/// A resolved neighbour: an address on a device and its MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub addr: Ipv4Addr,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// The next hop towards each of `members` through `uplink`, as `routes` and `neighbours`
/// give it: the gateway of the most specific route (the lowest metric among equals), or the
/// member itself on a route without one, and that address's MAC on the uplink. Members routed
/// elsewhere, or whose next hop is not resolved, are left out.
#[must_use]
pub fn next_hops(
    members: &BTreeSet<Ipv4Addr>,
    routes: &[Route],
    neighbours: &[Neighbour],
    uplink: u32,
) -> BTreeMap<Ipv4Addr, NextHop> {
    members
        .iter()
        .filter_map(|member| {
            let route = routes
                .iter()
                .filter(|route| route.destination.contains(member))
                .min_by_key(|route| {
                    (
                        std::cmp::Reverse(route.destination.prefix_len()),
                        route.priority,
                    )
                })?;
            if route.oif != uplink {
                return None;
            }
            let hop = route.gateway.unwrap_or(*member);
            let neighbour = neighbours
                .iter()
                .find(|n| n.addr == hop && n.ifindex == uplink)?;
            Some((
                *member,
                NextHop {
                    ifindex: uplink,
                    mac: neighbour.mac,
                },
            ))
        })
        .collect()
}

/// How often the members are looked at again (a new member's next hop waits at most this long;
/// until then its packets take the FIB lookup).
const MEMBERS_EVERY: Duration = Duration::from_secs(2);
/// How long notifications are gathered before one new resolution.
const SETTLE: Duration = Duration::from_millis(200);
/// The kernel's main routing table.
const MAIN_TABLE: u32 = 254;

/// Follows the next hops towards the members for as long as the agent runs, writing them into
/// the model. Fails when the kernel's notifications cannot be had or stop: the next hops
/// would go stale unnoticed.
pub async fn follow(
    handle: Handle,
    uplink: u32,
    model: Arc<ModelHandle>,
) -> anyhow::Result<Infallible> {
    let (connection, _, mut messages) =
        new_multicast_connection(&[MulticastGroup::Neigh, MulticastGroup::Ipv4Route])
            .context("subscribing to route and neighbour notifications")?;
    tokio::spawn(connection);
    let mut ticks = tokio::time::interval(MEMBERS_EVERY);
    loop {
        let known = members(&model);
        let resolved = match resolve(&handle, uplink, &known).await {
            Ok(resolved) => resolved,
            Err(e) => {
                warn!("resolving the overlay's next hops: {e:#}");
                BTreeMap::new()
            }
        };
        model.update(|m| m.set_next_hops(resolved));
        // Until a route or neighbour changes, or a member comes or goes.
        loop {
            tokio::select! {
                message = messages.next() => {
                    if message.is_none() {
                        anyhow::bail!("route and neighbour notifications stopped");
                    }
                    tokio::time::sleep(SETTLE).await;
                    while let Ok(Some(_)) =
                        tokio::time::timeout(Duration::ZERO, messages.next()).await
                    {}
                    break;
                }
                _ = ticks.tick() => {
                    if members(&model) != known {
                        break;
                    }
                }
            }
        }
    }
}

/// The overlay's members as the model has them now.
fn members(model: &ModelHandle) -> BTreeSet<Ipv4Addr> {
    let mut members = BTreeSet::new();
    model.update(|m| {
        members = m.members();
        false
    });
    members
}

/// The next hops towards `members` as the node's tables have them now.
async fn resolve(
    handle: &Handle,
    uplink: u32,
    members: &BTreeSet<Ipv4Addr>,
) -> Result<BTreeMap<Ipv4Addr, NextHop>, NetdevError> {
    if members.is_empty() {
        return Ok(BTreeMap::new());
    }
    let routes = netdev::routes(handle).await?;
    let neighbours = netdev::neighbours(handle).await?;
    let routes: Vec<Route> = routes.iter().filter_map(route_of).collect();
    let neighbours: Vec<Neighbour> = neighbours.iter().filter_map(neighbour_of).collect();
    Ok(next_hops(members, &routes, &neighbours, uplink))
}

fn route_of(message: &RouteMessage) -> Option<Route> {
    if message.header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(message.header.table);
    let (mut destination, mut gateway, mut oif, mut priority) =
        (Ipv4Addr::UNSPECIFIED, None, None, 0);
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(addr)) => destination = *addr,
            RouteAttribute::Gateway(RouteAddress::Inet(addr)) => gateway = Some(*addr),
            RouteAttribute::Oif(index) => oif = Some(*index),
            RouteAttribute::Priority(value) => priority = *value,
            RouteAttribute::Table(value) => table = *value,
            _ => {}
        }
    }
    (table == MAIN_TABLE).then_some(())?;
    Some(Route {
        destination: Ipv4Net::new(destination, message.header.destination_prefix_length).ok()?,
        gateway,
        oif: oif?,
        priority,
    })
}

fn neighbour_of(message: &NeighbourMessage) -> Option<Neighbour> {
    // What the kernel would send to without resolving first.
    let valid = matches!(
        message.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    if !valid {
        return None;
    }
    let mut addr = None;
    let mut mac = None;
    for attribute in &message.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => addr = Some(*ip),
            NeighbourAttribute::LinkLayerAddress(bytes) if bytes.len() == 6 => {
                mac = <[u8; 6]>::try_from(bytes.as_slice()).ok();
            }
            _ => {}
        }
    }
    Some(Neighbour {
        addr: addr?,
        ifindex: message.header.ifindex,
        mac: mac?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(destination: &str, gateway: Option<[u8; 4]>, oif: u32, priority: u32) -> Route {
        Route {
            destination: destination.parse().unwrap(),
            gateway: gateway.map(Ipv4Addr::from),
            oif,
            priority,
        }
    }

    fn neighbour(addr: [u8; 4], ifindex: u32, last: u8) -> Neighbour {
        Neighbour {
            addr: addr.into(),
            ifindex,
            mac: [2, 0, 0, 0, 0, last],
        }
    }

    #[test]
    fn a_member_on_the_uplinks_segment_is_its_own_next_hop() {
        let members = BTreeSet::from([Ipv4Addr::new(192, 168, 50, 2)]);
        let routes = [
            route("0.0.0.0/0", Some([192, 168, 50, 254]), 2, 0),
            route("192.168.50.0/24", None, 2, 0),
        ];
        let neighbours = [
            neighbour([192, 168, 50, 2], 2, 0x22),
            neighbour([192, 168, 50, 254], 2, 0xfe),
        ];
        assert_eq!(
            next_hops(&members, &routes, &neighbours, 2),
            BTreeMap::from([(
                Ipv4Addr::new(192, 168, 50, 2),
                NextHop {
                    ifindex: 2,
                    mac: [2, 0, 0, 0, 0, 0x22]
                }
            )])
        );
    }

    #[test]
    fn a_routed_member_is_reached_through_the_gateway_of_its_most_specific_route() {
        let members = BTreeSet::from([Ipv4Addr::new(10, 1, 2, 3)]);
        let routes = [
            route("0.0.0.0/0", Some([192, 168, 50, 254]), 2, 0),
            route("10.1.0.0/16", Some([192, 168, 50, 253]), 2, 100),
            route("10.1.0.0/16", Some([192, 168, 50, 252]), 2, 50),
        ];
        let neighbours = [
            neighbour([192, 168, 50, 254], 2, 0xfe),
            neighbour([192, 168, 50, 253], 2, 0xfd),
            neighbour([192, 168, 50, 252], 2, 0xfc),
        ];
        let hops = next_hops(&members, &routes, &neighbours, 2);
        assert_eq!(hops[&Ipv4Addr::new(10, 1, 2, 3)].mac, [2, 0, 0, 0, 0, 0xfc]);
    }

    #[test]
    fn unresolved_or_elsewhere_is_left_to_the_datapath() {
        let here = Ipv4Addr::new(192, 168, 50, 2);
        let elsewhere = Ipv4Addr::new(10, 9, 0, 1);
        let members = BTreeSet::from([here, elsewhere]);
        let routes = [
            route("192.168.50.0/24", None, 2, 0),
            route("10.9.0.0/16", None, 3, 0),
        ];
        // No neighbour for the first; the second is routed through device 3, not the uplink.
        let neighbours = [neighbour([10, 9, 0, 1], 3, 1)];
        assert!(next_hops(&members, &routes, &neighbours, 2).is_empty());
    }
}
