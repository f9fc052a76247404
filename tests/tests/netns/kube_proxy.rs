//! Moving a node off kube-proxy: `weft cleanup --kube-proxy` removes what kube-proxy's iptables
//! and nftables modes leave on a node, without the kube-proxy binary, and nothing else: in a
//! namespace holding kube-proxy's rules (IPv4 and IPv6, nat and filter), kubelet's, flannel's
//! and an nftables table of kube-proxy's beside someone else's.

use std::fs;

use weft_tests::{
    cluster::weft_binary,
    netns::{Netns, require_root, run, unique},
};

/// kube-proxy's iptables mode on a flannel node with one Service, as `iptables-save` prints it.
const RULES: &str = "\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:FLANNEL-POSTRTG - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-QW3VDQNRVPFBNL5V - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-4N57TFCL4MD7ZTDA - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-SEP-QW3VDQNRVPFBNL5V -s 172.30.20.6/32 -m comment --comment \"default/nginx\" -j KUBE-MARK-MASQ
-A KUBE-SEP-QW3VDQNRVPFBNL5V -p tcp -m comment --comment \"default/nginx\" -m tcp -j DNAT --to-destination 172.30.20.6:80
-A KUBE-SERVICES -d 10.254.40.119/32 -p tcp -m comment --comment \"default/nginx cluster IP\" -m tcp --dport 4432 -j KUBE-SVC-4N57TFCL4MD7ZTDA
-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-4N57TFCL4MD7ZTDA -m comment --comment \"default/nginx -> 172.30.20.6:80\" -j KUBE-SEP-QW3VDQNRVPFBNL5V
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:FLANNEL-FWD - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A FLANNEL-FWD -s 172.30.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT
COMMIT
";

/// kube-proxy's IPv6 rules on a dual-stack node.
const RULES6: &str = "\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -j KUBE-SERVICES
COMMIT
";

/// kube-proxy's nftables mode keeps to its own tables; another table stays.
const TABLES: &str = "\
table ip kube-proxy {
\tchain nat-prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t}
}
table ip6 kube-proxy {
\tchain nat-prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t}
}
table ip someone-else {
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t}
}
";

fn saved(ns: &Netns, program: &str) -> String {
    ns.exec(program, &[]).expect("listing the rules")
}

#[test]
fn cleanup_kube_proxy_removes_its_chains_and_tables_and_nothing_else() {
    require_root();
    let ns = Netns::create(&unique("wkpx")).expect("a namespace");
    let dir = tempfile::tempdir().expect("a directory for the rules");
    for (file, text, program) in [
        ("rules", RULES, "iptables-restore"),
        ("rules6", RULES6, "ip6tables-restore"),
        ("tables", TABLES, "nft"),
    ] {
        let path = dir.path().join(file);
        fs::write(&path, text).expect("writing the rules");
        let path = path.display().to_string();
        let args: Vec<&str> = if program == "nft" {
            vec!["-f", &path]
        } else {
            vec![&path]
        };
        ns.exec(program, &args).expect("loading the rules");
    }
    let weft = weft_binary().display().to_string();
    let cleanup = || {
        run(
            "ip",
            &["netns", "exec", ns.name(), &weft, "cleanup", "--kube-proxy"],
        )
    };
    cleanup().expect("weft cleanup --kube-proxy");

    let rules = saved(&ns, "iptables-save");
    for gone in [
        "KUBE-SERVICES",
        "KUBE-SVC-",
        "KUBE-SEP-",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
        "KUBE-FORWARD",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-PROXY-FIREWALL",
    ] {
        assert!(!rules.contains(gone), "{gone} is left:\n{rules}");
    }
    for kept in [
        ":FLANNEL-POSTRTG",
        "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG",
        "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD",
        "-A FLANNEL-FWD -s 172.30.0.0/16",
        // kubelet's, not kube-proxy's.
        "-A INPUT -j KUBE-FIREWALL",
        "-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8",
    ] {
        assert!(rules.contains(kept), "{kept} is gone:\n{rules}");
    }
    let rules6 = saved(&ns, "ip6tables-save");
    assert!(!rules6.contains("KUBE-"), "{rules6}");
    let tables = ns
        .exec("nft", &["list", "tables"])
        .expect("nft list tables");
    assert!(!tables.contains("kube-proxy"), "{tables}");
    assert!(tables.contains("table ip someone-else"), "{tables}");

    // Nothing left of kube-proxy's: a second run succeeds and changes nothing.
    cleanup().expect("a second weft cleanup --kube-proxy");
    let rules_only = |saved: &str| -> Vec<String> {
        saved
            .lines()
            .filter(|line| !line.starts_with('#'))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(rules_only(&saved(&ns, "iptables-save")), rules_only(&rules));
    assert_eq!(
        ns.exec("nft", &["list", "tables"])
            .expect("nft list tables"),
        tables
    );
}
