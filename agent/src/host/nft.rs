//! weft's nftables table: what kube-proxy's `KUBE-POSTROUTING` amounts to (masquerade what the
//! datapath marked, clearing the mark so a packet that loops back is not masqueraded twice),
//! and, with `--ip-masq`, flannel's `FLANNEL-POSTRTG` rules for pod traffic leaving the pod
//! network. The table is weft's own; nothing else in the ruleset is touched.

use std::{
    io,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use ipnet::Ipv4Net;
use weft_common::MASQUERADE_MARK;

use crate::host::command::{self, CommandError};

/// The nftables table weft owns in the node's network namespace.
pub const TABLE: &str = "weft";

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run `nft` (install the nftables package)")]
    Spawn(#[source] io::Error),
    #[error("`nft -f -` refused the ruleset: {stderr}")]
    Refused { stderr: String },
}

/// The overlay seen from this node: the pod `network` and this node's own `gateway` address in
/// it. Masqueraded traffic into the Network leaves from the gateway, not from the uplink's
/// address, so the replies come back through the overlay, where this node undoes the
/// masquerade (flannel gets the same from `flannel.1`'s address, which masquerade picks there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlay {
    pub network: Ipv4Net,
    pub gateway: Ipv4Addr,
}

/// What weft's table holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Masquerade {
    pub overlay: Option<Overlay>,
    /// With the overlay: flannel's `--ip-masq` rules for this node's pod `subnet`. Traffic from
    /// the pod Network to outside it (multicast aside) leaves with the node's address, and so
    /// does traffic from outside to pods of other nodes; this node's own subnet is reached
    /// unmasqueraded.
    pub ip_masq_subnet: Option<Ipv4Net>,
}

/// The ruleset, written so that loading it twice leaves one copy (add, delete, recreate).
#[must_use]
pub fn ruleset(masquerade: &Masquerade) -> String {
    let to_overlay = masquerade
        .overlay
        .map_or_else(String::new, |Overlay { network, gateway }| {
            format!("\t\tip daddr {network} snat ip to {gateway} fully-random\n")
        });
    let pod_rules = match (masquerade.overlay, masquerade.ip_masq_subnet) {
        (Some(Overlay { network, gateway }), Some(subnet)) => format!(
            "\t\tip saddr {network} ip daddr {network} return\n\
             \t\tip saddr {network} ip daddr != 224.0.0.0/4 masquerade fully-random\n\
             \t\tip saddr != {network} ip daddr {subnet} return\n\
             \t\tip saddr != {network} ip daddr {network} snat ip to {gateway} fully-random\n"
        ),
        _ => String::new(),
    };
    format!(
        "add table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tmeta mark & {MASQUERADE_MARK:#010x} == {MASQUERADE_MARK:#010x} \
         meta mark set meta mark & {clear:#010x} goto marked\n\
         {pod_rules}\
         \t}}\n\
         \tchain marked {{\n\
         {to_overlay}\
         \t\tmasquerade fully-random\n\
         \t}}\n\
         }}\n",
        clear = !MASQUERADE_MARK,
    )
}

fn nft(script: &str) -> Result<(), NftError> {
    match command::run("nft", &["-f", "-"], Some(script)) {
        Ok(_) => Ok(()),
        Err(CommandError::Spawn { source, .. }) => Err(NftError::Spawn(source)),
        Err(CommandError::Failed { stderr, .. }) => Err(NftError::Refused { stderr }),
    }
}

/// Installs (or replaces, in one transaction) the table. It stays when the agent exits, so
/// masquerading goes on; [`remove`] takes it away.
pub fn install(masquerade: &Masquerade) -> Result<(), NftError> {
    nft(&ruleset(masquerade))
}

/// Removes the table; none there is no error.
pub fn remove() -> Result<(), NftError> {
    nft(&format!("add table ip {TABLE}\ndelete table ip {TABLE}\n"))
}

/// Removes the table `family name` (someone else's, such as kube-proxy's); returns whether it
/// was there.
pub fn remove_table(family: &str, name: &str) -> Result<bool, NftError> {
    let listed = Command::new("nft")
        .args(["list", "tables"])
        .stderr(Stdio::null())
        .output()
        .map_err(NftError::Spawn)?;
    let wanted = format!("table {family} {name}");
    let there = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .any(|line| line.trim() == wanted);
    if there {
        nft(&format!("delete {wanted}\n"))?;
    }
    Ok(there)
}

#[cfg(test)]
mod tests {
    use super::{Masquerade, Overlay, ruleset};

    fn overlay() -> Overlay {
        Overlay {
            network: "172.30.0.0/16".parse().unwrap(),
            gateway: "172.30.20.1".parse().unwrap(),
        }
    }

    #[test]
    fn the_rule_matches_and_clears_kube_proxys_mark() {
        let rules = ruleset(&Masquerade::default());
        assert!(
            rules.contains(
                "meta mark & 0x00004000 == 0x00004000 meta mark set meta mark & 0xffffbfff goto marked"
            ),
            "{rules}"
        );
        assert!(rules.contains("type nat hook postrouting priority srcnat"));
        assert!(rules.contains("\t\tmasquerade fully-random"));
        assert!(
            !rules.contains("ip saddr") && !rules.contains("snat"),
            "{rules}"
        );
    }

    #[test]
    fn marked_traffic_into_the_overlay_leaves_from_the_gateway() {
        let rules = ruleset(&Masquerade {
            overlay: Some(overlay()),
            ip_masq_subnet: None,
        });
        let lines: Vec<&str> = rules.lines().map(str::trim).collect();
        let chain = lines.iter().position(|l| *l == "chain marked {").unwrap();
        assert_eq!(
            lines[chain + 1..chain + 3],
            [
                "ip daddr 172.30.0.0/16 snat ip to 172.30.20.1 fully-random",
                "masquerade fully-random"
            ]
        );
    }

    #[test]
    fn ip_masq_adds_flannels_four_rules_after_the_mark_rule() {
        let rules = ruleset(&Masquerade {
            overlay: Some(overlay()),
            ip_masq_subnet: Some("172.30.20.0/24".parse().unwrap()),
        });
        let lines: Vec<&str> = rules.lines().map(str::trim).collect();
        let mark = lines
            .iter()
            .position(|l| l.starts_with("meta mark"))
            .unwrap();
        assert_eq!(
            lines[mark + 1..mark + 5],
            [
                "ip saddr 172.30.0.0/16 ip daddr 172.30.0.0/16 return",
                "ip saddr 172.30.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
                "ip saddr != 172.30.0.0/16 ip daddr 172.30.20.0/24 return",
                "ip saddr != 172.30.0.0/16 ip daddr 172.30.0.0/16 snat ip to 172.30.20.1 fully-random",
            ]
        );
    }
}
