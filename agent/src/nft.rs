//! weft's nftables table: the one rule kube-proxy's `KUBE-POSTROUTING` amounts to (masquerade
//! what the datapath marked, clearing the mark so a packet that loops back is not masqueraded
//! twice), and, with `--ip-masq`, flannel's `FLANNEL-POSTRTG` rules for pod traffic leaving the
//! pod network. The table is weft's own; nothing else in the ruleset is touched.

use std::{
    io::{self, Write as _},
    process::{Command, Stdio},
};

use ipnet::Ipv4Net;
use weft_common::MASQUERADE_MARK;

/// The nftables table weft owns in the node's network namespace.
pub const TABLE: &str = "weft";

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run `nft` (install the nftables package)")]
    Spawn(#[source] io::Error),
    #[error("`nft -f -` refused the ruleset: {stderr}")]
    Refused { stderr: String },
}

/// Pod masquerade as flannel's `--ip-masq` does it: traffic from the pod `network` to outside
/// it (multicast aside) leaves with the node's address, and so does traffic from outside to
/// pods of other nodes; this node's own `subnet` is reached unmasqueraded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodMasquerade {
    pub network: Ipv4Net,
    pub subnet: Ipv4Net,
}

/// The ruleset, written so that loading it twice leaves one copy (add, delete, recreate).
#[must_use]
pub fn ruleset(pods: Option<PodMasquerade>) -> String {
    let pod_rules = pods.map_or_else(String::new, |PodMasquerade { network, subnet }| {
        format!(
            "\t\tip saddr {network} ip daddr {network} return\n\
             \t\tip saddr {network} ip daddr != 224.0.0.0/4 masquerade fully-random\n\
             \t\tip saddr != {network} ip daddr {subnet} return\n\
             \t\tip saddr != {network} ip daddr {network} masquerade fully-random\n"
        )
    });
    format!(
        "add table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tmeta mark & {MASQUERADE_MARK:#010x} == {MASQUERADE_MARK:#010x} \
         meta mark set meta mark & {clear:#010x} masquerade fully-random\n\
         {pod_rules}\
         \t}}\n\
         }}\n",
        clear = !MASQUERADE_MARK,
    )
}

fn nft(script: &str) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .map_err(NftError::Spawn)?;
    let output = child.wait_with_output().map_err(NftError::Spawn)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NftError::Refused {
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// The installed table; dropping it removes the table, on every way out of the agent.
#[must_use = "dropping the table removes it"]
pub struct Table(());

impl Table {
    /// Installs (or replaces) the table.
    pub fn install(pods: Option<PodMasquerade>) -> Result<Self, NftError> {
        nft(&ruleset(pods))?;
        Ok(Self(()))
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        if let Err(e) = nft(&format!("add table ip {TABLE}\ndelete table ip {TABLE}\n")) {
            tracing::warn!("removing the nftables table ip {TABLE}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{PodMasquerade, ruleset};

    #[test]
    fn the_rule_matches_and_clears_kube_proxys_mark() {
        let rules = ruleset(None);
        assert!(rules.contains(
            "meta mark & 0x00004000 == 0x00004000 meta mark set meta mark & 0xffffbfff masquerade fully-random"
        ), "{rules}");
        assert!(rules.contains("type nat hook postrouting priority srcnat"));
        assert!(
            !rules.contains("ip saddr"),
            "no pod masquerade unless asked"
        );
    }

    #[test]
    fn ip_masq_adds_flannels_four_rules_after_the_mark_rule() {
        let rules = ruleset(Some(PodMasquerade {
            network: "172.30.0.0/16".parse().unwrap(),
            subnet: "172.30.20.0/24".parse().unwrap(),
        }));
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
                "ip saddr != 172.30.0.0/16 ip daddr 172.30.0.0/16 masquerade fully-random",
            ]
        );
    }
}
