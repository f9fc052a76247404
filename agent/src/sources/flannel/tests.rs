use super::*;

fn net(text: &str) -> Ipv4Net {
    text.parse().unwrap()
}

#[test]
fn the_seeds_config_gets_flannels_defaults() {
    let config =
        parse_config(r#"{"Network":"172.30.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#)
            .unwrap();
    assert_eq!(
        config,
        NetworkConfig {
            network: net("172.30.0.0/16"),
            subnet_len: 24,
            subnet_min: "172.30.1.0".parse().unwrap(),
            subnet_max: "172.30.255.0".parse().unwrap(),
            vni: 1,
            port: 8472,
            mtu: None,
            ipv6: None,
        }
    );
    assert_eq!(config.candidates().count(), 255);
}

#[test]
fn subnet_len_defaults_follow_the_network_size() {
    let len = |network: &str| {
        parse_config(&format!(
            r#"{{"Network":"{network}","Backend":{{"Type":"vxlan"}}}}"#
        ))
        .map(|c| c.subnet_len)
    };
    assert_eq!(len("10.0.0.0/8"), Ok(24));
    assert_eq!(len("10.0.0.0/22"), Ok(24));
    assert_eq!(len("10.0.0.0/23"), Ok(25));
    assert_eq!(len("10.0.0.0/28"), Ok(30));
    assert!(matches!(
        len("10.0.0.0/0"),
        Err(ConfigError::Invalid { key: "Network", .. })
    ));
    assert_eq!(
        len("10.0.0.0/29"),
        Err(ConfigError::NetworkTooSmall {
            key: "Network",
            network: net("10.0.0.0/29").into(),
            smallest: 28
        })
    );
}

/// flannel's dual-stack config (its `Documentation/configuration.md`): the IPv6 half is read
/// and checked as flanneld checks it, the same rules at 128 bits.
#[test]
fn the_ipv6_half_is_checked_as_flannel_checks_it() {
    let with = |extra: &str| {
        parse_config(&format!(
            r#"{{"EnableIPv6":true,"Network":"10.42.0.0/16","Backend":{{"Type":"vxlan"}}{extra}}}"#
        ))
    };
    let half = |network: &str, subnet_len| {
        Some(Ipv6Half {
            network: network.parse().unwrap(),
            subnet_len,
        })
    };
    let v6_len = |network: &str| {
        with(&format!(r#","IPv6Network":"{network}""#))
            .map(|config| config.ipv6.unwrap().subnet_len)
    };
    let config = with(r#","IPv6Network":"2001:cafe:42::/56""#).unwrap();
    assert_eq!(config.ipv6, half("2001:cafe:42::/56", 64));
    assert_eq!(config.subnet_len, 24, "the IPv4 half is as without IPv6");
    assert_eq!(v6_len("fc00::/62"), Ok(64));
    assert_eq!(v6_len("fc00::/63"), Ok(65));
    assert_eq!(v6_len("fc00::/124"), Ok(126));
    assert_eq!(
        v6_len("fc00::/125"),
        Err(ConfigError::NetworkTooSmall {
            key: "IPv6Network",
            network: "fc00::/125".parse().unwrap(),
            smallest: 124
        })
    );
    assert_eq!(
        with(r#","IPv6Network":"fc00::5/48""#).unwrap().ipv6,
        half("fc00::/48", 64),
        "a host address names its network, as for IPv4"
    );
    let explicit = with(
        r#","IPv6Network":"fc00::/48","IPv6SubnetLen":80,"IPv6SubnetMin":"fc00:0:0:1::","IPv6SubnetMax":"fc00:0:0:2::""#,
    )
    .unwrap();
    assert_eq!(explicit.ipv6, half("fc00::/48", 80));
    let error = |extra: &str| with(&format!(r#","IPv6Network":"fc00::/48"{extra}"#)).unwrap_err();
    assert_eq!(
        error(r#","IPv6SubnetLen":127"#),
        ConfigError::SubnetTooSmall {
            key: "IPv6SubnetLen",
            len: 127,
            largest: 126
        }
    );
    assert!(matches!(
        error(r#","IPv6SubnetLen":49"#),
        ConfigError::TooFewSubnets {
            key: "IPv6SubnetLen",
            ..
        }
    ));
    assert!(matches!(
        error(r#","IPv6SubnetMin":"fc01::""#),
        ConfigError::OutsideNetwork {
            key: "IPv6SubnetMin",
            ..
        }
    ));
    assert!(matches!(
        error(r#","IPv6SubnetMax":"fc00:0:0:2::1""#),
        ConfigError::Unaligned {
            key: "IPv6SubnetMax",
            subnet_len: 64,
            ..
        }
    ));
    assert!(matches!(
        error(r#","IPv6SubnetMin":"10.42.1.0""#),
        ConfigError::Invalid {
            key: "IPv6SubnetMin",
            ..
        }
    ));
    assert_eq!(with(""), Err(ConfigError::MissingIpv6Network));
    assert!(matches!(
        with(r#","IPv6Network":"10.43.0.0/16""#),
        Err(ConfigError::Invalid {
            key: "IPv6Network",
            ..
        })
    ));
    // Without EnableIPv6 flannel checks none of it, but still decodes it, and fails on what it
    // cannot decode (its decoder takes either family).
    let without = |extra: &str| {
        parse_config(&format!(
            r#"{{"Network":"10.42.0.0/16","Backend":{{"Type":"vxlan"}}{extra}}}"#
        ))
    };
    assert_eq!(
        without(r#","IPv6Network":"10.43.0.0/16","IPv6SubnetLen":200"#)
            .unwrap()
            .ipv6,
        None
    );
    for (junk, key) in [
        (r#","IPv6Network":"junk""#, "IPv6Network"),
        (r#","IPv6SubnetLen":-1"#, "IPv6SubnetLen"),
        (r#","IPv6SubnetMax":"fc00::/64""#, "IPv6SubnetMax"),
    ] {
        assert!(
            matches!(without(junk), Err(ConfigError::Invalid { key: k, .. }) if k == key),
            "{junk}"
        );
    }
    // flannel reads a /0 network as unset, and the zero address as an unset bound.
    assert!(matches!(
        with(r#","IPv6Network":"::/0""#),
        Err(ConfigError::Invalid {
            key: "IPv6Network",
            ..
        })
    ));
    assert_eq!(
        with(r#","IPv6Network":"fc00::/48","IPv6SubnetMin":"::""#).map(|c| c.ipv6),
        Ok(half("fc00::/48", 64))
    );
    assert!(matches!(
        parse_config(r#"{"EnableIPv6":"yes","Network":"10.42.0.0/16","Backend":{"Type":"vxlan"}}"#),
        Err(ConfigError::Invalid {
            key: "EnableIPv6",
            ..
        })
    ));
}

#[test]
fn an_ipv6_only_network_is_refused_saying_so() {
    let error = parse_config(
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}"#,
    )
    .unwrap_err();
    assert_eq!(error, ConfigError::Ipv6Only);
    assert!(error.to_string().contains("EnableIPv4 is false"), "{error}");
    assert_eq!(
        parse_config(r#"{"EnableIPv4":false,"Backend":{"Type":"vxlan"}}"#),
        Err(ConfigError::Ipv6Only),
        "neither family"
    );
}

#[test]
fn keys_match_case_insensitively_as_in_go() {
    let config =
        parse_config(r#"{"network":"10.5.0.0/16","backend":{"type":"vxlan","vni":4,"port":4789}}"#)
            .unwrap();
    assert_eq!((config.vni, config.port), (4, 4789));
}

#[test]
fn explicit_bounds_are_checked() {
    let with = |extra: &str| {
        parse_config(&format!(
            r#"{{"Network":"10.5.0.0/16","Backend":{{"Type":"vxlan"}}{extra}}}"#
        ))
    };
    let ok = with(r#","SubnetMin":"10.5.10.0","SubnetMax":"10.5.20.0""#).unwrap();
    assert_eq!(ok.candidates().count(), 11);
    let unset = with(r#","SubnetMin":"0.0.0.0""#).unwrap();
    assert_eq!(unset.subnet_min, "10.5.1.0".parse::<Ipv4Addr>().unwrap());
    assert!(matches!(
        with(r#","SubnetMin":"10.6.0.0""#),
        Err(ConfigError::OutsideNetwork {
            key: "SubnetMin",
            ..
        })
    ));
    assert!(matches!(
        with(r#","SubnetMax":"10.5.20.7""#),
        Err(ConfigError::Unaligned {
            key: "SubnetMax",
            ..
        })
    ));
    assert!(matches!(
        with(r#","SubnetMin":"10.5.30.0","SubnetMax":"10.5.20.0""#),
        Err(ConfigError::EmptyRange { .. })
    ));
    assert_eq!(
        with(r#","SubnetLen":31"#),
        Err(ConfigError::SubnetTooSmall {
            key: "SubnetLen",
            len: 31,
            largest: 30
        })
    );
    assert!(matches!(
        with(r#","SubnetLen":17"#),
        Err(ConfigError::TooFewSubnets {
            key: "SubnetLen",
            ..
        })
    ));
}

#[test]
fn errors_name_what_is_wrong() {
    assert_eq!(
        parse_config(r#"{"SubnetLen":24}"#),
        Err(ConfigError::MissingNetwork)
    );
    assert!(matches!(
        parse_config(r#"{"Network":"172.30.0.0"}"#),
        Err(ConfigError::Invalid { key: "Network", .. })
    ));
    assert_eq!(
        parse_config(r#"{"Network":"172.30.0.0/16"}"#),
        Err(ConfigError::UnsupportedBackend("udp".into())),
        "no Backend means udp, as in flannel's code"
    );
    assert_eq!(
        parse_config(r#"{"Network":"172.30.0.0/16","Backend":{"Type":"host-gw"}}"#),
        Err(ConfigError::UnsupportedBackend("host-gw".into()))
    );
    assert!(matches!(
        parse_config(r#"{"Network":"172.30.0.0/16","Backend":{"Type":"vxlan","VNI":16777216}}"#),
        Err(ConfigError::Invalid {
            key: "Backend.VNI",
            ..
        })
    ));
    assert!(matches!(parse_config("[1]"), Err(ConfigError::NotJson(_))));
    assert_eq!(
        parse_config(r#"{"Network":"172.30.0.0/16","Backend":{"Type":"vxlan","GBP":true}}"#),
        Err(ConfigError::UnsupportedGbp)
    );
}

#[test]
fn lease_json_is_flannels_byte_for_byte_and_round_trips() {
    let lease = Lease {
        public_ip: "10.167.226.38".parse().unwrap(),
        vni: 1,
        vtep_mac: "b6:c7:0f:7f:66:a7".parse().unwrap(),
    };
    let json = lease.to_json();
    assert_eq!(
        json,
        r#"{"PublicIP":"10.167.226.38","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"b6:c7:0f:7f:66:a7"}}"#
    );
    assert_eq!(Lease::parse(&json), Ok(lease));
}

#[test]
fn every_entry_flanneld_reads_is_found_by_its_public_ip() {
    let ip: Ipv4Addr = "10.167.226.38".parse().unwrap();
    let attrs = |json: &str| LeaseAttrs::parse(json).unwrap_or_else(|e| panic!("{json}: {e}"));
    // Reservations as operators write them, following flannel's documentation.
    for reservation in [
        r#"{"PublicIP":"10.167.226.38"}"#,
        r#"{"PublicIP":"10.167.226.38","PublicIPv6":null}"#,
        r#"{"publicip":"10.167.226.38","BackendType":null,"BackendData":null}"#,
        r#"{"PublicIP":"10.167.226.38","BackendType":""}"#,
        r#"{"PublicIP":"10.167.226.38","BackendType":"vxlan"}"#,
        r#"{"PublicIP":"10.167.226.38","PublicIPv6":"fc00::5","BackendType":"vxlan","BackendData":null}"#,
    ] {
        assert_eq!(
            attrs(reservation),
            LeaseAttrs {
                public_ip: ip,
                vxlan: Err(LeaseError::NoBackendData)
            },
            "{reservation}"
        );
    }
    // Another backend's entry, or vxlan data this node cannot use: still the node's own.
    let host_gw = attrs(r#"{"PublicIP":"10.167.226.38","BackendType":"host-gw"}"#);
    assert_eq!(host_gw.public_ip, ip);
    assert_eq!(
        host_gw.vxlan,
        Err(LeaseError::OtherBackend("host-gw".into()))
    );
    let garbled =
        attrs(r#"{"PublicIP":"10.167.226.38","BackendType":"vxlan","BackendData":{"VtepMAC":7}}"#);
    assert_eq!(
        garbled.vxlan,
        Err(LeaseError::Field {
            field: "BackendData.VtepMAC"
        })
    );
    // A full lease, old form (no PublicIPv6) and new.
    let full = attrs(
        r#"{"PublicIP":"10.167.226.38","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"b6:c7:0f:7f:66:a7"},"BackendV6Data":null}"#,
    );
    assert_eq!(full.vxlan.map(|l| l.public_ip), Ok(ip));
    // What flanneld cannot read at all is refused with the field named.
    for (junk, field) in [
        (r#"{"PublicIPv6":null}"#, "PublicIP"),
        (r#"{"PublicIP":null}"#, "PublicIP"),
        (r#"{"PublicIP":"10.167.226"}"#, "PublicIP"),
        (
            r#"{"PublicIP":"10.167.226.38","PublicIPv6":"fc00::x"}"#,
            "PublicIPv6",
        ),
        (
            r#"{"PublicIP":"10.167.226.38","PublicIPv6":5}"#,
            "PublicIPv6",
        ),
        (
            r#"{"PublicIP":"10.167.226.38","BackendType":1}"#,
            "BackendType",
        ),
    ] {
        let error = LeaseAttrs::parse(junk).expect_err(junk);
        assert_eq!(error, LeaseError::Field { field }, "{junk}");
        assert!(error.to_string().contains(field), "{error}");
    }
}

#[test]
fn the_seeds_lease_without_a_vni_parses() {
    let lease = Lease::parse(r#"{"PublicIP":"10.167.226.38","BackendType":"vxlan","BackendData":{"VtepMAC":"b6:c7:0f:7f:66:a7"}}"#).unwrap();
    assert_eq!(lease.vni, 1);
    assert_eq!(lease.vtep_mac.to_string(), "b6:c7:0f:7f:66:a7");
}

#[test]
fn malformed_leases_are_refused() {
    assert!(matches!(Lease::parse("{"), Err(LeaseError::NotJson(_))));
    assert_eq!(
        Lease::parse(r#"{"PublicIP":"1.2.3.4","BackendType":"udp"}"#),
        Err(LeaseError::OtherBackend("udp".into()))
    );
    assert_eq!(
        Lease::parse(
            r#"{"PublicIP":"1.2.3","BackendType":"vxlan","BackendData":{"VtepMAC":"b6:c7:0f:7f:66:a7"}}"#
        ),
        Err(LeaseError::Field { field: "PublicIP" })
    );
    assert_eq!(
        Lease::parse(
            r#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VtepMAC":"b6:c7"}}"#
        ),
        Err(LeaseError::Field {
            field: "BackendData.VtepMAC"
        })
    );
}

#[test]
fn subnet_keys_round_trip() {
    let subnet = net("172.30.20.0/24");
    let key = subnet_key("/kube-fujitsu/network", &subnet);
    assert_eq!(key, "/kube-fujitsu/network/subnets/172.30.20.0-24");
    assert_eq!(
        parse_subnet_key("/kube-fujitsu/network", &key),
        Some(subnet)
    );
    assert_eq!(
        parse_subnet_key(
            "/coreos.com/network/",
            "/coreos.com/network/subnets/10.5.52.0-24&fc00::-64"
        ),
        Some(net("10.5.52.0/24"))
    );
    assert_eq!(
        parse_subnet_key("/p", "/p/subnets/10.5.52.1-24"),
        None,
        "not a network address"
    );
    assert_eq!(parse_subnet_key("/p", "/p/subnets/junk"), None);
    assert_eq!(parse_subnet_key("/p", "/q/subnets/10.5.52.0-24"), None);
}

#[test]
fn subnet_env_is_flannels() {
    let config = parse_config(r#"{"Network":"172.30.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
    assert_eq!(
        subnet_env(&config, &net("172.30.20.0/24"), 1450, false),
        "FLANNEL_NETWORK=172.30.0.0/16\nFLANNEL_SUBNET=172.30.20.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
    );
}

#[test]
fn the_previous_subnet_is_read_back_from_subnet_env() {
    let config = parse_config(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
    let written = subnet_env(&config, &net("10.5.52.0/24"), 1450, false);
    assert_eq!(previous_subnet(&written), Some(net("10.5.52.0/24")));
    assert_eq!(previous_subnet("FLANNEL_NETWORK=10.5.0.0/16\n"), None);
    assert_eq!(previous_subnet("FLANNEL_SUBNET=10.5.52\n"), None);
}

#[test]
fn derived_vtep_macs_are_local_unicast() {
    let mac = vtep_mac_for("192.168.50.3".parse().unwrap());
    assert_eq!(mac.0[0] & 0x03, 0x02, "locally administered, unicast");
    assert_eq!(mac.to_string(), "0e:fe:c0:a8:32:03");
}

#[test]
fn holds_checks_length_and_range() {
    let config = parse_config(r#"{"Network":"172.30.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
    assert!(config.holds(&net("172.30.44.0/24")));
    assert!(
        !config.holds(&net("172.30.0.0/24")),
        "the first subnet is skipped"
    );
    assert!(!config.holds(&net("172.30.44.0/25")));
    assert!(!config.holds(&net("172.31.1.0/24")));
}

/// Properties over generated input: no input panics a parser, every error names what is
/// wrong, and what parses survives a round trip. Inputs tried per run: 4 x 1500 configs,
/// 5 x 1500 leases, 3 x 1500 subnet keys (18,000).
mod properties {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;
    use crate::sources::fuzz;

    const CASES: u32 = 1_500;

    /// A config flannel accepts, with keys in any case, and optional fields left out.
    fn valid_config() -> impl Strategy<Value = Value> {
        (
            any::<u32>(),
            1u8..=28,
            any::<u8>(),
            any::<Option<(u16, u16)>>(),
            any::<Option<(u128, u8, Option<u8>)>>(),
        )
            .prop_flat_map(|(addr, prefix, len_pick, bounds, ipv6)| {
                let network = Ipv4Net::new(Ipv4Addr::from(addr), prefix)
                    .expect("prefix <= 32")
                    .trunc();
                let subnet_len = (prefix + 2 + len_pick % (31 - prefix - 2)).min(30);
                // The IPv6 half: a network of /1../124, its subnet length explicit or not.
                let ipv6 = ipv6.map(|(addr, prefix, len_pick)| {
                    let prefix = prefix % 124 + 1;
                    let network = Ipv6Net::new(Ipv6Addr::from(addr), prefix)
                        .expect("prefix <= 128")
                        .trunc();
                    let subnet_len = len_pick.map(|pick| prefix + 2 + pick % (127 - prefix - 2));
                    (network, subnet_len)
                });
                (
                    Just((network, subnet_len, bounds, ipv6)),
                    any::<bool>(),
                    prop::option::of(0..=VNI_MAX),
                    prop::option::of(any::<u16>()),
                    prop::option::of(0u32..=65_535),
                    any::<Option<bool>>(),
                    prop::sample::select(vec!["", "lower", "upper"]),
                )
            })
            .prop_map(
                |((network, subnet_len, bounds, ipv6), explicit_len, vni, port, mtu, gbp, case)| {
                    let size = 1u32 << (32 - subnet_len);
                    let count = (u32_of(network.broadcast()) - u32_of(network.network())) / size;
                    let mut config =
                        json!({"Network": network.to_string(), "Backend": {"Type": "vxlan"}});
                    if explicit_len {
                        config["SubnetLen"] = json!(subnet_len);
                    }
                    if let Some((a, b)) = bounds.filter(|_| explicit_len) {
                        let at = |n: u16| {
                            u32_of(network.network()) + (u32::from(n) % (count + 1)) * size
                        };
                        let (lo, hi) = (at(a).min(at(b)), at(a).max(at(b)));
                        config["SubnetMin"] = json!(Ipv4Addr::from(lo).to_string());
                        config["SubnetMax"] = json!(Ipv4Addr::from(hi).to_string());
                    }
                    if let Some((network, subnet_len)) = ipv6 {
                        config["EnableIPv6"] = json!(true);
                        config["IPv6Network"] = json!(network.to_string());
                        if let Some(len) = subnet_len {
                            config["IPv6SubnetLen"] = json!(len);
                        }
                    }
                    let backend = &mut config["Backend"];
                    if let Some(vni) = vni {
                        backend["VNI"] = json!(vni);
                    }
                    if let Some(port) = port {
                        backend["Port"] = json!(port);
                    }
                    if let Some(mtu) = mtu {
                        backend["MTU"] = json!(mtu);
                    }
                    if let Some(gbp) = gbp {
                        backend["GBP"] = json!(gbp.then_some(false));
                    }
                    recase(&config, case)
                },
            )
    }

    /// `value` with every object key in lower or upper case (Go matches them either way).
    fn recase(value: &Value, case: &str) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| {
                        let k = match case {
                            "lower" => k.to_lowercase(),
                            "upper" => k.to_uppercase(),
                            _ => k.clone(),
                        };
                        (k, recase(v, case))
                    })
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    /// Every field of `config`, explicit.
    fn explicit(config: &NetworkConfig) -> String {
        let mut json = json!({
            "Network": config.network.to_string(),
            "SubnetLen": config.subnet_len,
            "SubnetMin": config.subnet_min.to_string(),
            "SubnetMax": config.subnet_max.to_string(),
            "Backend": {"Type": "vxlan", "VNI": config.vni, "Port": config.port},
        });
        if let Some(mtu) = config.mtu {
            json["Backend"]["MTU"] = json!(mtu);
        }
        if let Some(ipv6) = config.ipv6 {
            json["EnableIPv6"] = json!(true);
            json["IPv6Network"] = json!(ipv6.network.to_string());
            json["IPv6SubnetLen"] = json!(ipv6.subnet_len);
        }
        json.to_string()
    }

    /// What every accepted config satisfies, and that it reads back the same.
    fn check_config(config: &NetworkConfig) {
        let network = config.network;
        assert_eq!(network, network.trunc());
        assert!(network.prefix_len() > 0);
        assert!((network.prefix_len() + 2..=30).contains(&config.subnet_len));
        assert!(config.subnet_min <= config.subnet_max);
        let size = 1u32 << (32 - config.subnet_len);
        for bound in [config.subnet_min, config.subnet_max] {
            assert!(network.contains(&bound) && u32_of(bound).is_multiple_of(size));
        }
        let first = config.candidates().next().expect("at least one subnet");
        assert!(config.holds(&first) && network.contains(&first));
        assert!(config.vni <= VNI_MAX && config.port != 0);
        if let Some(ipv6) = config.ipv6 {
            assert_eq!(ipv6.network, ipv6.network.trunc());
            assert!(ipv6.network.prefix_len() > 0);
            assert!((ipv6.network.prefix_len() + 2..=126).contains(&ipv6.subnet_len));
        }
        assert_eq!(parse_config(&explicit(config)).as_ref(), Ok(config));
    }

    /// The message is non-empty and names the key at fault.
    fn check_config_error(error: &ConfigError) {
        let message = error.to_string();
        let names: &[&str] = match error {
            ConfigError::NotJson(_) => &["JSON"],
            ConfigError::MissingNetwork => &["Network"],
            ConfigError::MissingIpv6Network => &["EnableIPv6", "IPv6Network"],
            ConfigError::Ipv6Only => &["EnableIPv4"],
            ConfigError::Invalid { key, .. }
            | ConfigError::OutsideNetwork { key, .. }
            | ConfigError::Unaligned { key, .. }
            | ConfigError::NetworkTooSmall { key, .. }
            | ConfigError::SubnetTooSmall { key, .. }
            | ConfigError::TooFewSubnets { key, .. } => &[key],
            ConfigError::EmptyRange { .. } => &["SubnetMin", "SubnetMax"],
            ConfigError::UnsupportedBackend(_) => &["Backend.Type"],
            ConfigError::UnsupportedGbp => &["Backend.GBP"],
        };
        for name in names {
            assert!(message.contains(name), "{message:?} does not name {name}");
        }
    }

    fn check_config_text(text: &str) {
        match parse_config(text) {
            Ok(config) => check_config(&config),
            Err(error) => check_config_error(&error),
        }
    }

    fn valid_lease() -> impl Strategy<Value = Lease> {
        (any::<u32>(), 0..=VNI_MAX, any::<[u8; 6]>()).prop_map(|(ip, vni, mac)| Lease {
            public_ip: Ipv4Addr::from(ip),
            vni,
            vtep_mac: Mac(mac),
        })
    }

    fn check_lease_error(error: &LeaseError) {
        let message = error.to_string();
        let name = match error {
            LeaseError::NotJson(_) => "JSON",
            LeaseError::Field { field } => field,
            LeaseError::OtherBackend(_) | LeaseError::NoBackendData => "BackendType",
        };
        assert!(message.contains(name), "{message:?} does not name {name}");
    }

    /// Any text is an entry flanneld reads (its vxlan attributes usable or not, for a
    /// reason named) or one it cannot read (the field named), and the two parsers agree.
    fn check_lease_text(text: &str) {
        match LeaseAttrs::parse(text) {
            Ok(attrs) => match &attrs.vxlan {
                Ok(lease) => {
                    assert_eq!(lease.public_ip, attrs.public_ip);
                    assert_eq!(Lease::parse(&lease.to_json()), Ok(*lease));
                }
                Err(error) => check_lease_error(error),
            },
            Err(error) => check_lease_error(&error),
        }
        assert_eq!(
            Lease::parse(text),
            LeaseAttrs::parse(text).and_then(|attrs| attrs.vxlan)
        );
    }

    fn prefix() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(DEFAULT_PREFIX.to_owned()),
            Just("/kube-fujitsu/network/".to_owned()),
            "/[a-z./-]{0,12}",
        ]
    }

    fn check_key(prefix: &str, key: &str) {
        if let Some(net) = parse_subnet_key(prefix, key) {
            assert_eq!(net, net.trunc());
            let canonical = subnet_key(prefix, &net);
            assert!(
                key == canonical || key.starts_with(&format!("{canonical}&")),
                "{key:?} parses as {net}, whose key is {canonical:?}"
            );
        }
    }

    proptest! {
        #![proptest_config(fuzz::config(CASES))]

        #[test]
        fn any_text_is_a_config_or_an_error_naming_the_key(text in fuzz::text()) {
            check_config_text(&text);
        }

        #[test]
        fn valid_configs_parse_and_round_trip(config in valid_config()) {
            let parsed = parse_config(&config.to_string());
            prop_assert!(parsed.is_ok(), "{config} was refused: {parsed:?}");
            check_config_text(&config.to_string());
        }

        #[test]
        fn mutated_configs_are_accepted_whole_or_refused_by_name(
            config in valid_config().prop_flat_map(fuzz::mutated)
        ) {
            check_config_text(&config.to_string());
        }

        #[test]
        fn configs_with_flannels_fields_garbled_are_refused_by_name(
            config in valid_config(),
            key in prop::sample::select(vec![
                "Network", "SubnetLen", "SubnetMin", "SubnetMax", "Backend", "EnableIPv4",
                "EnableIPv6", "IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax",
            ]),
            value in fuzz::odd_value(),
        ) {
            let mut config = recase(&config, "");
            if let Some(object) = config.as_object_mut() {
                object.retain(|k, _| !k.eq_ignore_ascii_case(key));
                object.insert(key.to_owned(), value);
            }
            check_config_text(&config.to_string());
        }

        #[test]
        fn any_text_is_a_lease_or_an_error_naming_the_field(text in fuzz::text()) {
            check_lease_text(&text);
        }

        #[test]
        fn leases_round_trip(lease in valid_lease()) {
            prop_assert_eq!(Lease::parse(&lease.to_json()), Ok(lease));
        }

        /// Reservations in the forms flanneld accepts: `PublicIP` alone or beside null
        /// `PublicIPv6`/backend fields, keys in any case. Each is its node's entry and no
        /// peer yet; a full lease is both.
        #[test]
        fn reservations_are_their_nodes_entries_and_no_peers_yet(
            ip in any::<u32>(),
            nulls in prop::sample::subsequence(
                vec!["PublicIPv6", "BackendType", "BackendData", "BackendV6Data"], 0..=4),
            case in prop::sample::select(vec!["", "lower", "upper"]),
            lease in valid_lease(),
        ) {
            let public_ip = Ipv4Addr::from(ip);
            let mut reservation = json!({"PublicIP": public_ip.to_string()});
            for name in nulls {
                reservation[name] = Value::Null;
            }
            let text = recase(&reservation, case).to_string();
            prop_assert_eq!(
                LeaseAttrs::parse(&text),
                Ok(LeaseAttrs { public_ip, vxlan: Err(LeaseError::NoBackendData) }),
                "{}", text
            );
            let full = recase(&serde_json::from_str(&lease.to_json()).expect("JSON"), case);
            prop_assert_eq!(
                LeaseAttrs::parse(&full.to_string()),
                Ok(LeaseAttrs { public_ip: lease.public_ip, vxlan: Ok(lease) })
            );
        }

        #[test]
        fn mutated_leases_are_read_whole_or_refused_by_name(
            lease in valid_lease().prop_flat_map(|lease| {
                fuzz::mutated(serde_json::from_str(&lease.to_json()).expect("JSON"))
            })
        ) {
            check_lease_text(&lease.to_string());
        }

        #[test]
        fn any_text_in_a_lease_field_is_read_or_refused_by_name(
            lease in valid_lease(),
            field in prop::sample::select(vec!["PublicIP", "VtepMAC", "VNI"]),
            text in fuzz::text(),
        ) {
            let mut value: Value = serde_json::from_str(&lease.to_json()).expect("JSON");
            match field {
                "PublicIP" => value[field] = json!(text),
                _ => value["BackendData"][field] = json!(text),
            }
            check_lease_text(&value.to_string());
        }

        #[test]
        fn subnet_keys_round_trip(
            prefix in prefix(),
            addr in any::<u32>(),
            len in 0u8..=32,
        ) {
            let net = Ipv4Net::new(Ipv4Addr::from(addr), len).expect("len <= 32").trunc();
            prop_assert_eq!(parse_subnet_key(&prefix, &subnet_key(&prefix, &net)), Some(net));
        }

        #[test]
        fn any_key_parses_only_as_the_subnet_it_spells(prefix in prefix(), name in fuzz::text()) {
            check_key(&prefix, &format!("{}{name}", subnets_prefix(&prefix)));
            check_key(&prefix, &name);
        }

        #[test]
        fn number_shaped_keys_parse_only_as_the_subnet_they_spell(
            prefix in prefix(),
            name in "[0-9]{1,4}(\\.[0-9+]{1,4}){0,4}-[+0-9 ]{0,4}(&[0-9a-f:]{0,8}(-[0-9+]{0,4})?)?",
        ) {
            check_key(&prefix, &format!("{}{name}", subnets_prefix(&prefix)));
        }
    }
}
