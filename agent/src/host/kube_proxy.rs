//! What kube-proxy leaves on a node, and its removal (`weft cleanup --kube-proxy`): the step of
//! a migration that `kube-proxy --cleanup` does, without needing the kube-proxy binary on the
//! host. iptables mode: kube-proxy's chains in the `nat`, `filter` and `mangle` tables (IPv4 and
//! IPv6), with the rules of other chains that jump into them; nftables mode: its `kube-proxy`
//! tables. Everything else stays: other components' chains, and kubelet's own (`KUBE-FIREWALL`,
//! `KUBE-KUBELET-CANARY`, `KUBE-MARK-DROP`).

use std::{collections::BTreeSet, io};

use crate::host::command::{self, CommandError};

#[derive(Debug, thiserror::Error)]
pub enum KubeProxyCleanupError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("no iptables-nft-save or iptables-legacy-save here; install the iptables package")]
    NoIptables,
    #[error(transparent)]
    Nft(#[from] crate::host::nft::NftError),
}

/// The chains kube-proxy's iptables mode makes, by table (as `kube-proxy --cleanup` removes
/// them), and the prefixes of its per-service chains.
const OWNED: &[(&str, &[&str])] = &[
    (
        "nat",
        &[
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-MARK-MASQ",
            "KUBE-PROXY-CANARY",
        ],
    ),
    (
        "filter",
        &[
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-FORWARD",
            "KUBE-NODEPORTS",
            "KUBE-PROXY-FIREWALL",
            "KUBE-PROXY-CANARY",
        ],
    ),
    ("mangle", &["KUBE-PROXY-CANARY"]),
];
const OWNED_PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-SEP-",
    "KUBE-FW-",
    "KUBE-EXT-",
    "KUBE-XLB-",
];

fn owned(table: &str, chain: &str) -> bool {
    let listed = OWNED
        .iter()
        .any(|(owner, chains)| *owner == table && chains.contains(&chain));
    listed || (table == "nat" && OWNED_PREFIXES.iter().any(|p| chain.starts_with(p)))
}

/// The chain a rule (an `iptables-save` `-A` line's arguments) jumps or goes to, if any.
fn target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    while let Some(word) = words.next() {
        if word == "-j" || word == "-g" {
            return words.next();
        }
    }
    None
}

/// What removes kube-proxy's chains from the rules `iptables-save` printed: an
/// `iptables-restore --noflush` script that deletes the rules of other chains jumping into
/// them, then flushes and deletes them; and the chains it removes (`table/chain`). Empty when
/// there is nothing of kube-proxy's.
#[must_use]
pub fn removal_script(saved: &str) -> (String, Vec<String>) {
    let mut script = String::new();
    let mut removed = Vec::new();
    let mut table: Option<&str> = None;
    let mut chains: BTreeSet<&str> = BTreeSet::new();
    let mut jumps: Vec<&str> = Vec::new();
    for line in saved.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = Some(name.trim());
            chains.clear();
            jumps.clear();
        } else if let (Some(name), Some(chain)) = (table, line.strip_prefix(':')) {
            let chain = chain.split_whitespace().next().unwrap_or_default();
            if owned(name, chain) {
                chains.insert(chain);
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            if !chains.contains(chain) && target(rule).is_some_and(|t| chains.contains(t)) {
                jumps.push(rule);
            }
        } else if line.trim() == "COMMIT"
            && let Some(name) = table.take()
            && !chains.is_empty()
        {
            script.push_str(&format!("*{name}\n"));
            for rule in &jumps {
                script.push_str(&format!("-D {rule}\n"));
            }
            for chain in &chains {
                script.push_str(&format!("-F {chain}\n"));
            }
            for chain in &chains {
                script.push_str(&format!("-X {chain}\n"));
                removed.push(format!("{name}/{chain}"));
            }
            script.push_str("COMMIT\n");
        }
    }
    (script, removed)
}

/// The `iptables-save`/`iptables-restore` pairs of both backends and both families: kube-proxy
/// writes through whichever backend the node's iptables uses (its image's wrapper picks the one
/// holding rules), so both are looked at.
const IPTABLES: [(&str, &str); 4] = [
    ("iptables-nft-save", "iptables-nft-restore"),
    ("iptables-legacy-save", "iptables-legacy-restore"),
    ("ip6tables-nft-save", "ip6tables-nft-restore"),
    ("ip6tables-legacy-save", "ip6tables-legacy-restore"),
];

/// Removes what kube-proxy left on this node (its iptables chains, IPv4 and IPv6, in either
/// backend; its nftables tables); returns what it removed (`iptables-nft nat/KUBE-SERVICES`,
/// `nft ip kube-proxy`, ...). Nothing of kube-proxy's is no error; no iptables at all is.
pub fn remove() -> Result<Vec<String>, KubeProxyCleanupError> {
    let mut removed = Vec::new();
    let mut found = 0;
    for (save, restore) in IPTABLES {
        let saved = match command::run(save, &[], None) {
            Ok(saved) => saved,
            Err(CommandError::Spawn { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        found += 1;
        let (script, chains) = removal_script(&saved);
        if !chains.is_empty() {
            command::run(restore, &["--noflush"], Some(&script))?;
            let backend = save.trim_end_matches("-save");
            removed.extend(chains.into_iter().map(|chain| format!("{backend} {chain}")));
        }
    }
    if found == 0 {
        return Err(KubeProxyCleanupError::NoIptables);
    }
    for family in ["ip", "ip6"] {
        if crate::host::nft::remove_table(family, "kube-proxy")? {
            removed.push(format!("nft {family} kube-proxy"));
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::removal_script;

    /// What `iptables-save` prints on a node with kube-proxy (iptables mode), kubelet and
    /// flannel: one Service with one endpoint.
    const SAVED: &str = "\
# Generated by iptables-save
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:FLANNEL-POSTRTG - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-ABC - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-XYZ - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -j RETURN
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-SEP-ABC -s 172.30.20.6/32 -j KUBE-MARK-MASQ
-A KUBE-SEP-ABC -p tcp -m tcp -j DNAT --to-destination 172.30.20.6:80
-A KUBE-SERVICES -d 10.254.40.119/32 -p tcp -m tcp --dport 4432 -j KUBE-SVC-XYZ
-A KUBE-SVC-XYZ -j KUBE-SEP-ABC
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:FLANNEL-FWD - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD
-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
COMMIT
";

    #[test]
    fn kube_proxys_chains_and_the_jumps_into_them_go_and_nothing_else() {
        let (script, removed) = removal_script(SAVED);
        assert_eq!(
            removed,
            [
                "mangle/KUBE-PROXY-CANARY",
                "nat/KUBE-MARK-MASQ",
                "nat/KUBE-NODEPORTS",
                "nat/KUBE-POSTROUTING",
                "nat/KUBE-SEP-ABC",
                "nat/KUBE-SERVICES",
                "nat/KUBE-SVC-XYZ",
                "filter/KUBE-FORWARD",
            ]
        );
        assert_eq!(
            script,
            "*mangle\n-F KUBE-PROXY-CANARY\n-X KUBE-PROXY-CANARY\nCOMMIT\n\
             *nat\n\
             -D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -D OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -D POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
             -F KUBE-MARK-MASQ\n-F KUBE-NODEPORTS\n-F KUBE-POSTROUTING\n-F KUBE-SEP-ABC\n\
             -F KUBE-SERVICES\n-F KUBE-SVC-XYZ\n\
             -X KUBE-MARK-MASQ\n-X KUBE-NODEPORTS\n-X KUBE-POSTROUTING\n-X KUBE-SEP-ABC\n\
             -X KUBE-SERVICES\n-X KUBE-SVC-XYZ\nCOMMIT\n\
             *filter\n\
             -D FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
             -F KUBE-FORWARD\n-X KUBE-FORWARD\nCOMMIT\n"
        );
    }

    #[test]
    fn a_node_without_kube_proxy_needs_nothing() {
        let clean = "*nat\n:POSTROUTING ACCEPT [0:0]\n:FLANNEL-POSTRTG - [0:0]\n\
                     -A POSTROUTING -j FLANNEL-POSTRTG\nCOMMIT\n";
        assert_eq!(removal_script(clean), (String::new(), Vec::new()));
        assert_eq!(removal_script(""), (String::new(), Vec::new()));
    }
}
