//! The pod bridge's ports and the node's addresses, followed: service translation on every
//! port, the bridge's MAC in the overlay settings, the node's addresses for NodePorts.

use std::{convert::Infallible, time::Duration};

use anyhow::bail;
use ipnet::Ipv4Net;
use tracing::{info, warn};
use weft_common::maps::OverlayConfig;

use crate::{
    datapath::loader::Dataplane,
    host::netdev::{self, PortEvent, PortWatch},
    sources::ModelHandle,
};

/// How often the bridge's ports are listed again (netlink notifications can be lost).
const PORT_RESYNC: Duration = Duration::from_secs(30);

/// What the port watcher owns: the dataplane's attachments and the overlay settings that
/// follow the bridge.
pub(super) struct Ports {
    pub dataplane: Dataplane,
    pub netlink: rtnetlink::Handle,
    pub bridge: String,
    pub nodeport_addresses: Vec<Ipv4Net>,
    pub watch: PortWatch,
    pub overlay: Option<OverlayConfig>,
}

impl Ports {
    /// Follows the bridge's ports and the node's addresses for as long as the agent runs.
    pub async fn follow(mut self, model: &ModelHandle) -> anyhow::Result<Infallible> {
        let mut resync = tokio::time::interval(PORT_RESYNC);
        resync.tick().await;
        loop {
            tokio::select! {
                event = self.watch.next() => match event {
                    Some(PortEvent::Joined(link)) => {
                        attach_port(&mut self.dataplane, &self.netlink, &link).await;
                        self.follow_bridge_mac().await;
                    }
                    Some(PortEvent::Left(index)) => {
                        self.dataplane.detach_pod_port(index);
                        self.follow_bridge_mac().await;
                    }
                    Some(PortEvent::AddressesChanged) => self.refresh_addresses(model).await,
                    Some(PortEvent::Resync) => {
                        warn!("link notifications were lost; listing the bridge's ports again");
                        self.resync().await?;
                        self.refresh_addresses(model).await;
                    }
                    Some(PortEvent::BridgeMade) => {
                        info!(bridge = self.bridge, "the pod bridge appeared; translating on its ports");
                        self.resync().await?;
                        self.follow_bridge_mac().await;
                    }
                    None => bail!("the netlink link notifications stopped"),
                },
                _ = resync.tick() => {
                    self.resync().await?;
                    self.refresh_addresses(model).await;
                }
            }
        }
    }

    /// Keeps the bridge's MAC in the overlay settings: the source of frames the datapath
    /// delivers straight into pods, as their gateway's. A bridge without a MAC of its own takes
    /// its lowest port's, so it changes as pods come and go.
    pub async fn follow_bridge_mac(&mut self) {
        let Some(config) = &mut self.overlay else {
            return;
        };
        let mac = match netdev::link_by_name(&self.netlink, &self.bridge).await {
            Ok(Some(link)) => link.mac,
            Ok(None) => return,
            Err(e) => {
                warn!("reading the pod bridge's MAC: {e:#}");
                return;
            }
        };
        if mac != config.bridge_mac {
            config.bridge_mac = mac;
            if let Err(e) = self.dataplane.set_overlay(config) {
                warn!("writing the pod bridge's new MAC to the overlay settings: {e:#}");
            }
        }
    }

    /// Reads the node's addresses again, for NodePorts.
    async fn refresh_addresses(&self, model: &ModelHandle) {
        match netdev::node_addresses(&self.netlink, &self.nodeport_addresses).await {
            Ok(addresses) => {
                model.update(|m| m.update_node(|node| node.node_port_addresses = addresses));
            }
            Err(e) => warn!("listing the node's addresses for NodePorts: {e:#}"),
        }
    }

    /// Brings the attached ports in line with the bridge's ports: attaches to the ones missed
    /// (lost notifications, failed attaches) and forgets the ones gone. Follows the bridge if it
    /// was made again.
    pub async fn resync(&mut self) -> anyhow::Result<()> {
        let Some(bridge_link) = netdev::link_by_name(&self.netlink, &self.bridge).await? else {
            if self.overlay.is_some() {
                warn!(
                    bridge = self.bridge,
                    "the pod bridge is gone; pods on it are unreachable until it is back"
                );
            }
            return Ok(());
        };
        self.watch.set_bridge(bridge_link.index);
        let links = netdev::links(&self.netlink).await?;
        let current: Vec<&netdev::Link> = links
            .iter()
            .filter(|link| link.controller == Some(bridge_link.index))
            .collect();
        for link in &current {
            attach_port(&mut self.dataplane, &self.netlink, link).await;
        }
        let gone: Vec<u32> = self
            .dataplane
            .pod_ports()
            .filter(|index| !current.iter().any(|link| link.index == *index))
            .collect();
        for index in gone {
            self.dataplane.detach_pod_port(index);
        }
        // Pods learned on ports that left while no agent ran, or whose notification was lost.
        let forgotten = self
            .dataplane
            .forget_pods(|port| current.iter().any(|link| link.index == port))?;
        if forgotten > 0 {
            info!(forgotten, "forgot pods of ports that are gone");
        }
        Ok(())
    }
}

/// Attaches the service programs to the bridge's ports that carry no earlier agent's: nothing
/// is translated on them yet, so they lose nothing by running before the first pass fills the
/// maps, and each new tcx attachment costs an RCU grace period in the kernel (some 15 ms,
/// serialized under the RTNL lock: measured, 0.3 s for 11 ports), which is better spent while
/// the service source is read. Ports an earlier agent attached to are swapped after the first
/// pass ([`Ports::resync`]), so its translations never meet maps that are still filling.
pub(super) async fn attach_fresh_ports(
    dataplane: &mut Dataplane,
    netlink: &rtnetlink::Handle,
    bridge: &str,
) -> anyhow::Result<()> {
    let Some(bridge_link) = netdev::link_by_name(netlink, bridge).await? else {
        return Ok(());
    };
    for link in netdev::links(netlink).await? {
        if link.controller == Some(bridge_link.index) && dataplane.is_fresh_port(link.index) {
            attach_port(dataplane, netlink, &link).await;
        }
    }
    Ok(())
}

async fn attach_port(dataplane: &mut Dataplane, netlink: &rtnetlink::Handle, port: &netdev::Link) {
    if dataplane.has_pod_port(port.index) {
        return;
    }
    if let Err(e) = netdev::set_hairpin(netlink, port).await {
        warn!(
            port = port.name,
            "a pod on this port cannot reach itself through a service: {e:#}"
        );
    }
    match dataplane.attach_pod_port(&port.name, port.index, port.veth, port.peer_netns) {
        Ok(()) => tracing::debug!(port = port.name, "service translation attached"),
        // The port may already be gone again (a pod that failed to start).
        Err(e) => warn!(port = port.name, "cannot attach service translation: {e:#}"),
    }
}
