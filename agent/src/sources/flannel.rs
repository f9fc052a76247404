//! flannel's schema, exactly: the network config (etcd's `<prefix>/config`, or the
//! `net-conf.json` of flannel's kube subnet manager), subnet leases (etcd's
//! `<prefix>/subnets/<a.b.c.d>-<len>` holding flannel's `LeaseAttrs` JSON, or a Node's
//! [`annotations`]), subnet arithmetic, and `/run/flannel/subnet.env`. Pure: no I/O. The
//! reference is flannel's `pkg/subnet/config.go`, `pkg/lease/lease.go`, `pkg/subnet/kube` and
//! `pkg/backend/vxlan`.

pub mod annotations;

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use std::collections::BTreeMap;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::Value;
use weft_common::vxlan::{DEFAULT_PORT, DEFAULT_VNI, VNI_MAX};

use crate::model::NodeLease;

/// flannel's default etcd prefix.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";
/// The one backend weft speaks.
pub const VXLAN: &str = "vxlan";

/// The network config, with flannel's defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The whole pod network.
    pub network: Ipv4Net,
    /// Prefix length of each node's subnet.
    pub subnet_len: u8,
    /// First and last subnet a node may lease (network addresses).
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub vni: u32,
    pub port: u16,
    /// `Backend.MTU`, when set: overrides the uplink MTU minus the encapsulation overhead.
    pub mtu: Option<u32>,
    /// The IPv6 half, when `EnableIPv6` is set: checked as flannel checks it, not served yet.
    pub ipv6: Option<Ipv6Half>,
}

/// `IPv6Network` and `IPv6SubnetLen` (flannel's default filled in) of a dual-stack network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Half {
    pub network: Ipv6Net,
    pub subnet_len: u8,
}

/// A config flannel would reject, or one weft cannot serve. Each names the key at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("the config is not a JSON object: {0}")]
    NotJson(String),
    #[error("Network is missing; set it to the pod network, e.g. \"172.30.0.0/16\"")]
    MissingNetwork,
    #[error("{key} {value:?} is not {what}")]
    Invalid {
        key: &'static str,
        value: String,
        what: &'static str,
    },
    #[error("{key} {network} is too small: the smallest usable {key} is a /{smallest}")]
    NetworkTooSmall {
        key: &'static str,
        network: IpNet,
        smallest: u8,
    },
    #[error("{key} {len} must be {largest} or less")]
    SubnetTooSmall {
        key: &'static str,
        len: u8,
        largest: u8,
    },
    #[error("{key} {subnet_len} leaves fewer than four subnets in {network}")]
    TooFewSubnets {
        key: &'static str,
        network: IpNet,
        subnet_len: u8,
    },
    #[error("{key} {value} is outside {network}")]
    OutsideNetwork {
        key: &'static str,
        value: IpAddr,
        network: IpNet,
    },
    #[error("{key} {value} is not on a /{subnet_len} boundary")]
    Unaligned {
        key: &'static str,
        value: IpAddr,
        subnet_len: u8,
    },
    #[error("EnableIPv6 is set but IPv6Network is missing; set it, e.g. \"fc00::/48\"")]
    MissingIpv6Network,
    #[error(
        "EnableIPv4 is false, and weft serves only IPv4 networks so far (IPv6 not yet); keep \
         flanneld on these nodes"
    )]
    Ipv6Only,
    #[error("SubnetMin {min} is above SubnetMax {max}")]
    EmptyRange { min: Ipv4Addr, max: Ipv4Addr },
    #[error(
        "Backend.Type is {0:?}; weft speaks only \"vxlan\" (a config without Backend means \"udp\" to flannel)"
    )]
    UnsupportedBackend(String),
    #[error("Backend.GBP is set; weft does not speak VXLAN group-based policy")]
    UnsupportedGbp,
}

/// A JSON field by name, matched case-insensitively as Go's `encoding/json` does. A dotted
/// name (`Backend.VNI`, as errors call it) is looked up by its last part.
fn field<'a>(object: &'a Value, name: &str) -> Option<&'a Value> {
    let name = name.rsplit('.').next().unwrap_or(name);
    object
        .as_object()?
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value)
        .filter(|value| !value.is_null())
}

fn text_field(object: &Value, key: &'static str) -> Result<Option<String>, ConfigError> {
    match field(object, key) {
        None => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(other) => Err(ConfigError::Invalid {
            key,
            value: other.to_string(),
            what: "a string",
        }),
    }
}

fn number_field(object: &Value, key: &'static str, max: u64) -> Result<Option<u64>, ConfigError> {
    match field(object, key) {
        None => Ok(None),
        Some(value) => value
            .as_u64()
            .filter(|n| *n <= max)
            .map(Some)
            .ok_or_else(|| ConfigError::Invalid {
                key,
                value: value.to_string(),
                what: "a whole number in range",
            }),
    }
}

fn bool_field(object: &Value, key: &'static str) -> Result<Option<bool>, ConfigError> {
    match field(object, key) {
        None => Ok(None),
        Some(Value::Bool(value)) => Ok(Some(*value)),
        Some(other) => Err(ConfigError::Invalid {
            key,
            value: other.to_string(),
            what: "true or false",
        }),
    }
}

/// A string field read as `what` (an address or CIDR of the network's family).
fn parsed_field<T: std::str::FromStr>(
    object: &Value,
    key: &'static str,
    what: &'static str,
) -> Result<Option<T>, ConfigError> {
    text_field(object, key)?
        .map(|text| {
            text.parse().map_err(|_| ConfigError::Invalid {
                key,
                value: text,
                what,
            })
        })
        .transpose()
}

fn u32_of(addr: Ipv4Addr) -> u32 {
    u32::from(addr)
}

/// An address as a number, both families alike, so one piece of arithmetic serves both.
fn number_of(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(v4) => u128::from(u32_of(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The keys of one family's half of the config.
struct HalfKeys {
    network: &'static str,
    subnet_len: &'static str,
    subnet_min: &'static str,
    subnet_max: &'static str,
    /// The subnet length given where the network holds at least four of them: /24 or /64.
    default_len: u8,
}

const IPV4_KEYS: HalfKeys = HalfKeys {
    network: "Network",
    subnet_len: "SubnetLen",
    subnet_min: "SubnetMin",
    subnet_max: "SubnetMax",
    default_len: 24,
};

const IPV6_KEYS: HalfKeys = HalfKeys {
    network: "IPv6Network",
    subnet_len: "IPv6SubnetLen",
    subnet_min: "IPv6SubnetMin",
    subnet_max: "IPv6SubnetMax",
    default_len: 64,
};

/// One family's subnet length and bounds, checked as flannel's `CheckNetworkConfig` checks
/// them, flannel's defaults filled in: a subnet needs four addresses and the network four
/// subnets, and the first subnet is skipped (its network address would be the network's).
fn subnet_range(
    object: &Value,
    keys: &HalfKeys,
    network: IpNet,
) -> Result<(u8, u128, u128), ConfigError> {
    let bits = network.max_prefix_len();
    let prefix = network.prefix_len();
    let subnet_len = match number_field(object, keys.subnet_len, u64::from(bits))? {
        Some(len) if len > 0 => {
            let len = len as u8;
            if len > bits - 2 {
                return Err(ConfigError::SubnetTooSmall {
                    key: keys.subnet_len,
                    len,
                    largest: bits - 2,
                });
            }
            if len < prefix + 2 {
                return Err(ConfigError::TooFewSubnets {
                    key: keys.subnet_len,
                    network,
                    subnet_len: len,
                });
            }
            len
        }
        _ if prefix > bits - 4 => {
            return Err(ConfigError::NetworkTooSmall {
                key: keys.network,
                network,
                smallest: bits - 4,
            });
        }
        _ if prefix <= keys.default_len - 2 => keys.default_len,
        _ => prefix + 2,
    };
    let size = 1u128 << (bits - subnet_len);
    let first = number_of(network.network());
    let last_subnet = number_of(network.broadcast()) - size + 1;
    let what = match network {
        IpNet::V4(_) => "an IPv4 address",
        IpNet::V6(_) => "an IPv6 address",
    };
    let bound = |key: &'static str, default: u128| -> Result<u128, ConfigError> {
        let Some(value) = parsed_field::<IpAddr>(object, key, what)? else {
            return Ok(default);
        };
        if value.is_ipv4() != network.network().is_ipv4() {
            return Err(ConfigError::Invalid {
                key,
                value: value.to_string(),
                what,
            });
        }
        // flannel reads the zero address as unset.
        if value.is_unspecified() {
            return Ok(default);
        }
        if !network.contains(&value) {
            return Err(ConfigError::OutsideNetwork {
                key,
                value,
                network,
            });
        }
        if !number_of(value).is_multiple_of(size) {
            return Err(ConfigError::Unaligned {
                key,
                value,
                subnet_len,
            });
        }
        Ok(number_of(value))
    };
    let min = bound(keys.subnet_min, first + size)?;
    let max = bound(keys.subnet_max, last_subnet)?;
    Ok((subnet_len, min, max))
}

/// `network` (truncated by the caller), refused if it is a /0, which flannel reads as unset.
fn set_network<N: Into<IpNet> + Copy>(key: &'static str, network: N) -> Result<N, ConfigError> {
    let whole: IpNet = network.into();
    if whole.prefix_len() == 0 {
        return Err(ConfigError::Invalid {
            key,
            value: whole.to_string(),
            what: "a pod network (flannel reads a /0 as unset)",
        });
    }
    Ok(network)
}

/// flanneld decodes the IPv6 fields whether `EnableIPv6` is set or not, and fails to start on
/// one it cannot read (its decoder takes either family); so does weft.
fn decode_ipv6_fields(object: &Value) -> Result<(), ConfigError> {
    parsed_field::<IpNet>(object, IPV6_KEYS.network, "a CIDR")?;
    number_field(object, IPV6_KEYS.subnet_len, u64::MAX)?;
    for key in [IPV6_KEYS.subnet_min, IPV6_KEYS.subnet_max] {
        parsed_field::<IpAddr>(object, key, "an IP address")?;
    }
    Ok(())
}

/// The IPv6 half of a config with `EnableIPv6`.
fn ipv6_half(object: &Value) -> Result<Ipv6Half, ConfigError> {
    let network: Ipv6Net = parsed_field(object, IPV6_KEYS.network, "an IPv6 CIDR")?
        .ok_or(ConfigError::MissingIpv6Network)?;
    let network = set_network(IPV6_KEYS.network, network.trunc())?;
    let (subnet_len, ..) = subnet_range(object, &IPV6_KEYS, network.into())?;
    Ok(Ipv6Half {
        network,
        subnet_len,
    })
}

/// Parses `<prefix>/config` and fills in flannel's defaults.
pub fn parse_config(json: &str) -> Result<NetworkConfig, ConfigError> {
    let object: Value =
        serde_json::from_str(json).map_err(|e| ConfigError::NotJson(e.to_string()))?;
    if !object.is_object() {
        return Err(ConfigError::NotJson("expected an object".into()));
    }
    // flannel's defaults: IPv4 on, IPv6 off.
    if !bool_field(&object, "EnableIPv4")?.unwrap_or(true) {
        return Err(ConfigError::Ipv6Only);
    }
    let network: Ipv4Net = parsed_field(&object, IPV4_KEYS.network, "an IPv4 CIDR")?
        .ok_or(ConfigError::MissingNetwork)?;
    let network = set_network(IPV4_KEYS.network, network.trunc())?;
    let (subnet_len, min, max) = subnet_range(&object, &IPV4_KEYS, network.into())?;
    let [subnet_min, subnet_max] = [min, max].map(|bound| {
        Ipv4Addr::from(u32::try_from(bound).expect("an address inside an IPv4 network"))
    });
    if subnet_min > subnet_max {
        return Err(ConfigError::EmptyRange {
            min: subnet_min,
            max: subnet_max,
        });
    }
    decode_ipv6_fields(&object)?;
    let ipv6 = if bool_field(&object, "EnableIPv6")?.unwrap_or(false) {
        Some(ipv6_half(&object)?)
    } else {
        None
    };
    let backend = field(&object, "Backend").cloned().unwrap_or(Value::Null);
    if !backend.is_object() && !backend.is_null() {
        return Err(ConfigError::Invalid {
            key: "Backend",
            value: backend.to_string(),
            what: "an object",
        });
    }
    let backend_type = text_field(&backend, "Backend.Type")?.unwrap_or_else(|| "udp".to_owned());
    if backend_type != VXLAN {
        return Err(ConfigError::UnsupportedBackend(backend_type));
    }
    if field(&backend, "GBP").and_then(Value::as_bool) == Some(true) {
        return Err(ConfigError::UnsupportedGbp);
    }
    let vni = number_field(&backend, "Backend.VNI", u64::from(VNI_MAX))?
        .map_or(DEFAULT_VNI, |v| v as u32);
    // flannel's Port 0 means the kernel's default, which is 8472.
    let port = match number_field(&backend, "Backend.Port", u64::from(u16::MAX))? {
        None | Some(0) => DEFAULT_PORT,
        Some(port) => port as u16,
    };
    let mtu = number_field(&backend, "Backend.MTU", 65_535)?
        .filter(|m| *m > 0)
        .map(|m| m as u32);
    Ok(NetworkConfig {
        network,
        subnet_len,
        subnet_min,
        subnet_max,
        vni,
        port,
        mtu,
        ipv6,
    })
}

impl NetworkConfig {
    /// Every subnet a node may lease, in order.
    pub fn candidates(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        let size = 1u32 << (32 - self.subnet_len);
        (u32_of(self.subnet_min)..=u32_of(self.subnet_max))
            .step_by(size as usize)
            .map(|addr| {
                Ipv4Net::new(Ipv4Addr::from(addr), self.subnet_len).expect("valid prefix length")
            })
    }

    /// Whether `subnet` is one this config hands out.
    #[must_use]
    pub fn holds(&self, subnet: &Ipv4Net) -> bool {
        subnet.prefix_len() == self.subnet_len
            && self.subnet_min <= subnet.network()
            && subnet.network() <= self.subnet_max
    }
}

/// A MAC address as flannel writes it (`b6:c7:0f:7f:66:a7`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl std::str::FromStr for Mac {
    type Err = ();

    fn from_str(text: &str) -> Result<Self, ()> {
        let mut mac = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut mac {
            *byte = u8::from_str_radix(parts.next().ok_or(())?, 16).map_err(|_| ())?;
        }
        if parts.next().is_some() {
            return Err(());
        }
        Ok(Self(mac))
    }
}

/// What a node publishes in its lease (flannel's `LeaseAttrs` with vxlan `BackendData`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub public_ip: Ipv4Addr,
    pub vni: u32,
    pub vtep_mac: Mac,
}

/// Why a lease value is not a vxlan node's lease.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("{field} is missing or invalid")]
    Field { field: &'static str },
    #[error(
        "no BackendType or BackendData yet: a reservation, which becomes a peer once its node \
         takes it and writes them"
    )]
    NoBackendData,
    #[error("BackendType is {0:?}, not \"vxlan\"")]
    OtherBackend(String),
}

/// A lease value as flanneld reads one (its `LeaseAttrs`): every entry with a PublicIP, which
/// is how a node finds its own (a reservation written as `{"PublicIP":"10.0.0.5"}` included),
/// and the vxlan attributes when the entry has them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseAttrs {
    pub public_ip: Ipv4Addr,
    /// The node as a vxlan peer, or why the entry is not one (yet).
    pub vxlan: Result<Lease, LeaseError>,
}

impl LeaseAttrs {
    /// Parses a lease value as Go's `encoding/json` reads it into flannel's `LeaseAttrs`:
    /// `PublicIP` an IPv4 address, `PublicIPv6` null or an IPv6 address, `BackendType` a
    /// string if there, `BackendData` any JSON. What flanneld would fail to read is an error
    /// naming the field.
    pub fn parse(json: &str) -> Result<Self, LeaseError> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| LeaseError::NotJson(e.to_string()))?;
        let public_ip = field(&value, "PublicIP")
            .and_then(Value::as_str)
            .and_then(|ip| ip.parse().ok())
            .ok_or(LeaseError::Field { field: "PublicIP" })?;
        if let Some(v6) = field(&value, "PublicIPv6")
            && v6
                .as_str()
                .and_then(|ip| ip.parse::<Ipv6Addr>().ok())
                .is_none()
        {
            return Err(LeaseError::Field {
                field: "PublicIPv6",
            });
        }
        let backend = match field(&value, "BackendType") {
            None => None,
            Some(Value::String(backend)) => Some(backend.as_str()),
            Some(_) => {
                return Err(LeaseError::Field {
                    field: "BackendType",
                });
            }
        };
        let vxlan = match backend {
            None | Some("") => Err(LeaseError::NoBackendData),
            Some(VXLAN) => field(&value, "BackendData")
                .ok_or(LeaseError::NoBackendData)
                .and_then(|data| vxlan_data(public_ip, data)),
            Some(other) => Err(LeaseError::OtherBackend(other.to_owned())),
        };
        Ok(Self { public_ip, vxlan })
    }
}

/// The vxlan `BackendData` of the node at `public_ip`. `VNI` may be missing (older flannel
/// wrote only `VtepMAC`).
fn vxlan_data(public_ip: Ipv4Addr, data: &Value) -> Result<Lease, LeaseError> {
    let vtep_mac = field(data, "VtepMAC")
        .and_then(Value::as_str)
        .and_then(|mac| mac.parse().ok())
        .ok_or(LeaseError::Field {
            field: "BackendData.VtepMAC",
        })?;
    let vni = match field(data, "VNI") {
        None => DEFAULT_VNI,
        Some(vni) => vni
            .as_u64()
            .filter(|v| *v <= u64::from(VNI_MAX))
            .ok_or(LeaseError::Field {
                field: "BackendData.VNI",
            })? as u32,
    };
    Ok(Lease {
        public_ip,
        vni,
        vtep_mac,
    })
}

impl Lease {
    /// The lease value, byte for byte as flannel marshals its `LeaseAttrs` for an IPv4-only
    /// node (`PublicIPv6` null; older flannel left it out, and reads it either way).
    #[must_use]
    pub fn to_json(&self) -> String {
        format!(
            r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{}}}"#,
            self.public_ip,
            self.backend_data()
        )
    }

    /// The vxlan `BackendData`, as flannel marshals its `vxlanLeaseAttrs`.
    #[must_use]
    pub fn backend_data(&self) -> String {
        format!(r#"{{"VNI":{},"VtepMAC":"{}"}}"#, self.vni, self.vtep_mac)
    }

    /// This lease as a peer of a network with `vni`.
    pub fn peer_on(self, vni: u32) -> Result<NodeLease, NotPeer> {
        if self.vni != vni {
            return Err(NotPeer::OtherVni(self.vni, vni));
        }
        Ok(NodeLease {
            public_ip: self.public_ip,
            vtep_mac: self.vtep_mac.0,
        })
    }

    /// Parses a vxlan node's lease value: [`LeaseAttrs::parse`] with usable vxlan attributes.
    pub fn parse(json: &str) -> Result<Self, LeaseError> {
        LeaseAttrs::parse(json)?.vxlan
    }
}

/// The etcd key of `subnet`'s lease: `<prefix>/subnets/172.30.20.0-24`.
#[must_use]
pub fn subnet_key(prefix: &str, subnet: &Ipv4Net) -> String {
    format!(
        "{}{}-{}",
        subnets_prefix(prefix),
        subnet.network(),
        subnet.prefix_len()
    )
}

/// The key prefix under which leases live.
#[must_use]
pub fn subnets_prefix(prefix: &str) -> String {
    format!("{}/subnets/", prefix.trim_end_matches('/'))
}

/// The key of the network config.
#[must_use]
pub fn config_key(prefix: &str) -> String {
    format!("{}/config", prefix.trim_end_matches('/'))
}

/// The subnet a lease key names; `None` for keys flannel would not write (dual-stack keys,
/// `10.5.52.0-24&fc00::-64`, yield their IPv4 half).
#[must_use]
pub fn parse_subnet_key(prefix: &str, key: &str) -> Option<Ipv4Net> {
    let name = key.strip_prefix(&subnets_prefix(prefix))?;
    let (v4, v6) = match name.split_once('&') {
        Some((v4, v6)) => (v4, Some(v6)),
        None => (name, None),
    };
    let (addr, len) = v4.split_once('-')?;
    let net = Ipv4Net::new(addr.parse().ok()?, len.parse().ok()?).ok()?;
    // Only the spelling flannel writes: `+24`, `024` or a host address would let two keys
    // name one subnet.
    if format!("{}-{}", net.trunc().network(), net.prefix_len()) != v4 {
        return None;
    }
    if let Some(v6) = v6 {
        let (addr, len) = v6.split_once('-')?;
        ipnet::Ipv6Net::new(addr.parse().ok()?, len.parse().ok()?).ok()?;
    }
    Some(net)
}

/// `subnet.env`, as flannel writes it for the CNI plugin.
#[must_use]
pub fn subnet_env(config: &NetworkConfig, subnet: &Ipv4Net, mtu: u32, ip_masq: bool) -> String {
    let gateway = subnet.hosts().next().unwrap_or(subnet.network());
    format!(
        "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={gateway}/{}\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ={ip_masq}\n",
        config.network,
        subnet.prefix_len()
    )
}

/// The subnet a `subnet.env` this node wrote earlier names (`FLANNEL_SUBNET=10.5.52.1/24`), which
/// flanneld tries again when etcd lost the node's lease, so its pods keep their addresses.
#[must_use]
pub fn previous_subnet(subnet_env: &str) -> Option<Ipv4Net> {
    subnet_env
        .lines()
        .find_map(|line| line.strip_prefix("FLANNEL_SUBNET="))
        .and_then(|subnet| subnet.trim().parse::<Ipv4Net>().ok())
        .map(|subnet| subnet.trunc())
}

/// A VtepMAC for a node that has none yet: locally administered, unicast, and derived from the
/// PublicIP, so a node that lost its lease comes back with the same one.
#[must_use]
pub fn vtep_mac_for(public_ip: Ipv4Addr) -> Mac {
    let [a, b, c, d] = public_ip.octets();
    Mac([0x0e, 0xfe, a, b, c, d])
}

/// Why another node's lease is not a peer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotPeer {
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    Node(#[from] annotations::NodeLeaseError),
    #[error("VNI {0} is not this network's {1}")]
    OtherVni(u32, u32),
    #[error("it carries this node's PublicIP, but is not the entry this node holds")]
    ThisNode,
    #[error("its subnet {0} is this node's: two Nodes hold one podCIDR")]
    OwnSubnet(Ipv4Net),
}

/// Other nodes' leases that are not peers, with why, keyed by what names them (a subnet in
/// etcd, a Node's name): each is logged when it starts being skipped (or for another reason),
/// not again at every event and listing.
#[derive(Debug)]
pub struct Skipped<K>(pub BTreeMap<K, NotPeer>);

impl<K> Default for Skipped<K> {
    fn default() -> Self {
        Self(BTreeMap::new())
    }
}

impl<K: Ord + Clone + fmt::Display> Skipped<K> {
    /// Records why `key`'s lease is skipped, and logs it unless that was said already;
    /// returns whether it logged.
    pub fn skip(&mut self, key: &K, why: NotPeer) -> bool {
        if self.0.get(key) == Some(&why) {
            return false;
        }
        if why.is_not_yet() {
            tracing::info!(lease = %key, "not a peer yet: {why}");
        } else {
            tracing::warn!(lease = %key, "lease skipped: {why}");
        }
        self.0.insert(key.clone(), why);
        true
    }

    /// `key`'s lease is a peer now, or gone.
    pub fn clear(&mut self, key: &K) {
        self.0.remove(key);
    }

    /// Forgets what a listing no longer has.
    pub fn retain_listed(&mut self, listed: impl Fn(&K) -> bool) {
        self.0.retain(|key, _| listed(key));
    }
}

impl NotPeer {
    /// Whether the node is on its way to being a peer (it has not published its lease yet),
    /// rather than wrong.
    fn is_not_yet(&self) -> bool {
        matches!(
            self,
            Self::Lease(LeaseError::NoBackendData)
                | Self::Node(
                    annotations::NodeLeaseError::NotManaged(_)
                        | annotations::NodeLeaseError::NoPodCidr
                )
        )
    }
}

#[cfg(test)]
mod tests;
