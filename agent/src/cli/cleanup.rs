//! `weft cleanup`: takes weft's dataplane off the node, as `cilium-dbg cleanup` does. The agent
//! leaves everything in place when it stops, so the node keeps forwarding; this removes the
//! program attachments, the pinned maps, the nftables table, the overlay route and VXLAN device. Running it
//! again finds nothing and succeeds. The node's lease in etcd is left to expire, as flannel's.
//!
//! `weft cleanup --kube-proxy` instead removes what kube-proxy left (its iptables chains, its
//! nftables tables), as `kube-proxy --cleanup` would, once weft serves the node's Services.

use std::{fs, io, path::PathBuf};

use anyhow::Context as _;
use aya::programs::TcAttachType;
use tracing::info;
use weft::{
    datapath::links,
    datapath::loader::{PROGRAMS_DIR, detach_netlink_filter},
    datapath::maps::{remove_pin, remove_pin_dir},
    host::{kube_proxy, netdev, nft},
};
use weft_common::maps::PINNED_MAPS;

#[derive(clap::Args)]
pub struct CleanupArgs {
    /// The agent's pin directory.
    #[arg(long, env = "WEFT_PIN_DIR", default_value = "/sys/fs/bpf/weft")]
    pin_dir: PathBuf,
    /// Remove kube-proxy's rules instead of weft's dataplane: its iptables chains (nat, filter,
    /// mangle; IPv4 and IPv6) and its nftables tables, as `kube-proxy --cleanup` does, for a
    /// node whose Services weft now serves. Kubelet's and other components' rules stay.
    #[arg(long)]
    kube_proxy: bool,
}

pub async fn run(args: &CleanupArgs) -> anyhow::Result<()> {
    if args.kube_proxy {
        let removed = kube_proxy::remove().context("removing kube-proxy's rules")?;
        info!(
            removed = removed.len(),
            what = removed.join(", "),
            "kube-proxy's rules are removed from this node"
        );
        return Ok(());
    }
    let detached = links::remove_all(&args.pin_dir)?;
    info!(attachments = detached.len(), "detached the pinned programs");
    let netlink = netdev::connect()?;
    // Netlink filters (--tc-attach=netlink) have no pins; they sit at weft's fixed priority.
    for link in netdev::links(&netlink).await? {
        for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
            detach_netlink_filter(&link.name, hook);
        }
    }
    nft::remove().context("removing the nftables table ip weft")?;
    for (network, uplink) in netdev::weft_routes(&netlink).await? {
        netdev::unroute_network(&netlink, network, uplink).await?;
        info!(%network, "removed the overlay route");
    }
    netdev::remove_tunnel_device(&netlink).await?;
    let programs = args.pin_dir.join(PROGRAMS_DIR);
    remove_pin_dir(&programs).with_context(|| format!("removing {}", programs.display()))?;
    for map in PINNED_MAPS {
        let path = args.pin_dir.join(map.name);
        remove_pin(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    match fs::remove_dir(&args.pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "removing {}: it holds pins that are not weft's; remove them by hand",
                    args.pin_dir.display()
                )
            });
        }
    }
    info!(pin_dir = %args.pin_dir.display(), "weft's dataplane is removed from this node");
    Ok(())
}
