//! The leases of flannel's kube subnet manager (`flanneld --kube-subnet-mgr`, the default of
//! kube-flannel.yml, k3s and RKE2): a node's subnet is its Node's `spec.podCIDR`, and what
//! flannel's etcd lease holds besides is in the Node's annotations, which the node's own agent
//! writes through the Node's status subresource. The reference is flannel's `pkg/subnet/kube`
//! (`kube.go`, `annotations.go`).

use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnet::Ipv4Net;
use serde_json::Value;

use super::{Lease, LeaseError, VXLAN, vxlan_data};

/// flannel's default `--kube-annotation-prefix`.
pub const DEFAULT_PREFIX: &str = "flannel.alpha.coreos.com";

/// The annotation keys under one prefix, as flannel names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Annotations {
    /// `"true"` once the node's agent has published its lease.
    pub kube_subnet_manager: String,
    pub backend_type: String,
    pub backend_data: String,
    pub public_ip: String,
    /// Set by an operator: the address this node advertises instead of its own (a node
    /// behind NAT, k3s's `--node-external-ip`).
    pub public_ip_overwrite: String,
}

/// A `--kube-annotation-prefix` flannel (or the API server) would not take.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("--kube-annotation-prefix {0:?} has more than one '/'")]
    Slashes(String),
    #[error(
        "--kube-annotation-prefix {0:?} is not a lower-case DNS name with at least one dot, \
         optionally followed by '/' and a name (e.g. flannel.alpha.coreos.com or \
         example.com/weft)"
    )]
    Format(String),
}

impl Annotations {
    /// The keys under `prefix`, completed as flannel completes it: `example.com` becomes
    /// `example.com/`, `example.com/weft` becomes `example.com/weft-`. flannel's check is a
    /// regular expression that is not anchored at the start; this one is, since the API server
    /// rejects keys whose prefix is not a lower-case DNS subdomain anyway.
    pub fn new(prefix: &str) -> Result<Self, PrefixError> {
        let slashes = prefix.matches('/').count();
        if slashes > 1 {
            return Err(PrefixError::Slashes(prefix.to_owned()));
        }
        let mut full = prefix.to_owned();
        if slashes == 0 {
            full.push('/');
        }
        if !full.ends_with('/') && !full.ends_with('-') {
            full.push('-');
        }
        let (domain, name) = full.split_once('/').expect("exactly one slash");
        let label = |part: &str| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        };
        let domain_ok = domain.contains('.') && domain.split('.').all(label);
        let name_ok = name.is_empty() || label(name);
        if !domain_ok || !name_ok {
            return Err(PrefixError::Format(prefix.to_owned()));
        }
        let key = |suffix: &str| format!("{full}{suffix}");
        Ok(Self {
            kube_subnet_manager: key("kube-subnet-manager"),
            backend_type: key("backend-type"),
            backend_data: key("backend-data"),
            public_ip: key("public-ip"),
            public_ip_overwrite: key("public-ip-overwrite"),
        })
    }

    /// The annotations a node holding `lease` publishes, byte for byte as flanneld writes them.
    #[must_use]
    pub fn of_lease(&self, lease: &Lease) -> BTreeMap<String, String> {
        BTreeMap::from([
            (self.backend_data.clone(), lease.backend_data()),
            (self.backend_type.clone(), VXLAN.to_owned()),
            (self.public_ip.clone(), lease.public_ip.to_string()),
            (self.kube_subnet_manager.clone(), "true".to_owned()),
        ])
    }

    /// Whether a Node with `annotations` lacks any of what publishing `lease` writes.
    #[must_use]
    pub fn differ(&self, annotations: &BTreeMap<String, String>, lease: &Lease) -> bool {
        self.of_lease(lease)
            .iter()
            .any(|(key, value)| annotations.get(key) != Some(value))
    }

    /// The address an operator set for the node to advertise, if any; an error carries the
    /// annotation's value when it is not an IPv4 address.
    pub fn public_ip_overwrite(
        &self,
        annotations: &BTreeMap<String, String>,
    ) -> Option<Result<Ipv4Addr, String>> {
        let value = annotations
            .get(&self.public_ip_overwrite)
            .filter(|value| !value.is_empty())?;
        Some(value.parse().map_err(|_| value.clone()))
    }

    /// The lease a Node publishes: its subnet (which must lie in `network`) and its vxlan
    /// attributes.
    pub fn node_lease(
        &self,
        annotations: &BTreeMap<String, String>,
        pod_cidr: Option<Ipv4Net>,
        network: Ipv4Net,
    ) -> Result<(Ipv4Net, Lease), NodeLeaseError> {
        if annotations
            .get(&self.kube_subnet_manager)
            .map(String::as_str)
            != Some("true")
        {
            return Err(NodeLeaseError::NotManaged(self.kube_subnet_manager.clone()));
        }
        let subnet = pod_cidr.ok_or(NodeLeaseError::NoPodCidr)?;
        if !network.contains(&subnet) {
            return Err(NodeLeaseError::OutsideNetwork { subnet, network });
        }
        let text = |key: &String| annotations.get(key).map_or("", String::as_str);
        let public_ip = text(&self.public_ip)
            .parse()
            .map_err(|_| NodeLeaseError::Invalid {
                key: self.public_ip.clone(),
                value: text(&self.public_ip).to_owned(),
                problem: "not an IPv4 address".to_owned(),
            })?;
        let backend = text(&self.backend_type);
        if backend != VXLAN {
            return Err(NodeLeaseError::OtherBackend(backend.to_owned()));
        }
        let data = text(&self.backend_data);
        let invalid = |problem: String| NodeLeaseError::Invalid {
            key: self.backend_data.clone(),
            value: data.to_owned(),
            problem,
        };
        let value: Value = serde_json::from_str(data).map_err(|e| invalid(e.to_string()))?;
        let lease =
            vxlan_data(public_ip, &value).map_err(|e: LeaseError| invalid(e.to_string()))?;
        Ok((subnet, lease))
    }
}

/// Why a Node is not an overlay member.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeLeaseError {
    #[error("its agent has not published a lease ({0} is not \"true\")")]
    NotManaged(String),
    #[error("it has no IPv4 spec.podCIDR yet")]
    NoPodCidr,
    #[error("its podCIDR {subnet} is outside the Network {network}")]
    OutsideNetwork { subnet: Ipv4Net, network: Ipv4Net },
    #[error("backend-type is {0:?}, not \"vxlan\"")]
    OtherBackend(String),
    #[error("{key} {value:?}: {problem}")]
    Invalid {
        key: String,
        value: String,
        problem: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::flannel::Mac;

    fn flannel() -> Annotations {
        Annotations::new(DEFAULT_PREFIX).unwrap()
    }

    fn lease() -> Lease {
        Lease {
            public_ip: Ipv4Addr::new(192, 168, 50, 7),
            vni: 1,
            vtep_mac: Mac([0xb6, 0xc7, 0x0f, 0x7f, 0x66, 0xa7]),
        }
    }

    fn published(extra: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut annotations = flannel().of_lease(&lease());
        for (key, value) in extra {
            annotations.insert((*key).to_owned(), (*value).to_owned());
        }
        annotations
    }

    #[test]
    fn prefixes_are_completed_and_checked_as_flannel_does() {
        let keys = |prefix: &str| Annotations::new(prefix).map(|a| a.backend_data);
        assert_eq!(
            keys("flannel.alpha.coreos.com").unwrap(),
            "flannel.alpha.coreos.com/backend-data"
        );
        assert_eq!(
            keys("example.com/weft").unwrap(),
            "example.com/weft-backend-data"
        );
        assert_eq!(
            keys("example.com/weft-").unwrap(),
            "example.com/weft-backend-data"
        );
        assert_eq!(keys("example.com/").unwrap(), "example.com/backend-data");
        for bad in [
            "a/b/c",
            "example",
            "Example.com",
            "example..com",
            "example.com/We ft",
        ] {
            assert!(keys(bad).is_err(), "{bad} was taken");
        }
    }

    #[test]
    fn a_lease_is_published_byte_for_byte_as_flanneld_writes_it() {
        let expected: BTreeMap<String, String> = [
            (
                "flannel.alpha.coreos.com/backend-data",
                r#"{"VNI":1,"VtepMAC":"b6:c7:0f:7f:66:a7"}"#,
            ),
            ("flannel.alpha.coreos.com/backend-type", "vxlan"),
            ("flannel.alpha.coreos.com/kube-subnet-manager", "true"),
            ("flannel.alpha.coreos.com/public-ip", "192.168.50.7"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(flannel().of_lease(&lease()), expected);
        assert!(!flannel().differ(&expected, &lease()));
        // Other annotations (kubelet's, an operator's) make no difference; a changed or missing
        // one of ours does.
        assert!(!flannel().differ(
            &published(&[("node.alpha.kubernetes.io/ttl", "0")]),
            &lease()
        ));
        let mut moved = expected.clone();
        moved.insert(
            "flannel.alpha.coreos.com/public-ip".into(),
            "192.168.50.8".into(),
        );
        assert!(flannel().differ(&moved, &lease()));
        let mut gone = expected;
        gone.remove("flannel.alpha.coreos.com/kube-subnet-manager");
        assert!(flannel().differ(&gone, &lease()));
    }

    #[test]
    fn a_nodes_annotations_read_back_into_its_lease_and_what_is_wrong_is_named() {
        let network: Ipv4Net = "10.244.0.0/16".parse().unwrap();
        let subnet: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        let a = flannel();
        assert_eq!(
            a.node_lease(&published(&[]), Some(subnet), network),
            Ok((subnet, lease()))
        );
        // flannel before 0.10 wrote VtepMAC only; VNI then defaults to 1.
        let old = published(&[(
            "flannel.alpha.coreos.com/backend-data",
            r#"{"VtepMAC":"b6:c7:0f:7f:66:a7"}"#,
        )]);
        assert_eq!(
            a.node_lease(&old, Some(subnet), network),
            Ok((subnet, lease()))
        );
        let error = |extra: &[(&str, &str)], cidr: Option<Ipv4Net>| {
            a.node_lease(&published(extra), cidr, network).unwrap_err()
        };
        assert_eq!(
            a.node_lease(&BTreeMap::new(), Some(subnet), network),
            Err(NodeLeaseError::NotManaged(
                "flannel.alpha.coreos.com/kube-subnet-manager".into()
            ))
        );
        assert_eq!(error(&[], None), NodeLeaseError::NoPodCidr);
        let outside: Ipv4Net = "10.99.0.0/24".parse().unwrap();
        assert_eq!(
            error(&[], Some(outside)),
            NodeLeaseError::OutsideNetwork {
                subnet: outside,
                network
            }
        );
        assert_eq!(
            error(
                &[("flannel.alpha.coreos.com/backend-type", "host-gw")],
                Some(subnet)
            ),
            NodeLeaseError::OtherBackend("host-gw".into())
        );
        for (key, value) in [
            ("flannel.alpha.coreos.com/public-ip", "fd00::7"),
            ("flannel.alpha.coreos.com/backend-data", "{"),
            ("flannel.alpha.coreos.com/backend-data", r#"{"VNI":1}"#),
            (
                "flannel.alpha.coreos.com/backend-data",
                r#"{"VNI":16777216,"VtepMAC":"b6:c7:0f:7f:66:a7"}"#,
            ),
        ] {
            assert!(
                matches!(
                    error(&[(key, value)], Some(subnet)),
                    NodeLeaseError::Invalid { key: k, .. } if k == key
                ),
                "{key}={value} was taken"
            );
        }
    }

    #[test]
    fn an_operators_public_ip_overwrite_is_read_when_set_and_valid() {
        let a = flannel();
        assert_eq!(a.public_ip_overwrite(&published(&[])), None);
        let key = "flannel.alpha.coreos.com/public-ip-overwrite";
        assert_eq!(a.public_ip_overwrite(&published(&[(key, "")])), None);
        assert_eq!(
            a.public_ip_overwrite(&published(&[(key, "203.0.113.9")])),
            Some(Ok(Ipv4Addr::new(203, 0, 113, 9)))
        );
        assert_eq!(
            a.public_ip_overwrite(&published(&[(key, "node-7")])),
            Some(Err("node-7".to_owned()))
        );
    }
}
