//! The etcd source: flannel's subnet manager, speaking flannel's etcd v3 schema (see
//! [`crate::flannel`]). It reads the network config, takes this node's lease (reusing the one
//! that carries its PublicIP, else claiming a free subnet with a create-if-absent transaction),
//! keeps the lease alive, and watches every node's lease into the model.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{BuildHasher as _, RandomState},
    net::Ipv4Addr,
    sync::Arc,
    time::Duration,
};

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use ipnet::Ipv4Net;
use tokio::sync::Notify;

use crate::{
    flannel::{
        Lease, LeaseError, Mac, NetworkConfig, config_key, parse_config, parse_subnet_key,
        subnet_key, subnets_prefix, vtep_mac_for,
    },
    model::NodeLease,
    source::ModelHandle,
};

/// flannel's lease time to live: 24 hours.
pub const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often the lease is renewed: well before it could expire.
const RENEW_EVERY: Duration = Duration::from_secs(3600);
/// How long to wait before trying etcd again after a failure.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How long to wait before renewing (or re-creating) the lease again after a failure.
const RENEW_RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SubnetError {
    #[error("etcd request failed: {}", crate::etcd::describe(.0))]
    Etcd(#[from] etcd_client::Error),
    #[error(
        "{key} is missing: write the network config there, e.g. \
             {{\"Network\":\"10.244.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}"
    )]
    MissingConfig { key: String },
    #[error("{key}: {source}")]
    BadConfig {
        key: String,
        #[source]
        source: crate::flannel::ConfigError,
    },
    #[error("no free subnet in {min}..{max} of {network}; every one is leased")]
    Exhausted {
        network: Ipv4Net,
        min: Ipv4Addr,
        max: Ipv4Addr,
    },
    #[error("the etcd watch on {prefix} ended")]
    WatchEnded { prefix: String },
}

impl SubnetError {
    /// Whether waiting may fix it (etcd unreachable) rather than an operator (a bad config).
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Etcd(_) | Self::WatchEnded { .. })
    }
}

/// Where the leases live and who this node is.
#[derive(Clone, Debug)]
pub struct SubnetSettings {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub public_ip: Ipv4Addr,
}

/// This node's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnLease {
    pub subnet: Ipv4Net,
    pub lease: Lease,
    /// The etcd lease the key is bound to; 0 for a reservation (a key without TTL).
    pub etcd_lease: i64,
}

/// Reads and checks `<prefix>/config`.
pub async fn read_config(client: &mut Client, prefix: &str) -> Result<NetworkConfig, SubnetError> {
    let key = config_key(prefix);
    let response = client.get(key.as_str(), None).await?;
    let value = response
        .kvs()
        .first()
        .ok_or_else(|| SubnetError::MissingConfig { key: key.clone() })?;
    let text = String::from_utf8_lossy(value.value());
    parse_config(&text).map_err(|source| SubnetError::BadConfig { key, source })
}

/// Reads the config, retrying every second while etcd is unreachable or the config is missing
/// or wrong, and saying each time what to fix.
pub async fn wait_for_config(client: &mut Client, prefix: &str) -> NetworkConfig {
    let mut last = String::new();
    loop {
        match read_config(client, prefix).await {
            Ok(config) => return config,
            Err(e) => {
                let message = format!("{e:#}");
                if message != last {
                    tracing::error!("cannot read the network config: {message}; retrying");
                    last = message;
                }
                tokio::time::sleep(RETRY_EVERY).await;
            }
        }
    }
}

/// Every lease under the prefix (subnet -> parsed lease or why it is unusable), and the
/// revision they were read at.
type Listing = (BTreeMap<Ipv4Net, (Result<Lease, LeaseError>, i64)>, i64);

async fn list(client: &mut Client, prefix: &str) -> Result<Listing, SubnetError> {
    let response = client
        .get(
            subnets_prefix(prefix),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    let revision = response.header().map_or(0, |h| h.revision());
    let leases = response
        .kvs()
        .iter()
        .filter_map(|kv| {
            let subnet = parse_subnet_key(prefix, std::str::from_utf8(kv.key()).ok()?)?;
            Some((
                subnet,
                (
                    Lease::parse(&String::from_utf8_lossy(kv.value())),
                    kv.lease(),
                ),
            ))
        })
        .collect();
    Ok((leases, revision))
}

/// A random index below `len` (flannel picks a random free subnet, so racing nodes rarely
/// reach for the same one).
fn random_below(len: usize) -> usize {
    (RandomState::new().hash_one(std::process::id()) % len as u64) as usize
}

/// Takes this node's lease: the one that already carries its PublicIP (a restart keeps its
/// subnet), else a free subnet claimed with a transaction that only creates an absent key, so
/// two nodes racing for one subnet cannot both win.
pub async fn acquire(
    client: &mut Client,
    settings: &SubnetSettings,
    config: &NetworkConfig,
) -> Result<OwnLease, SubnetError> {
    loop {
        let (leases, _) = list(client, &settings.prefix).await?;
        let mine = leases.iter().find(|(subnet, (lease, _))| {
            config.holds(subnet)
                && lease
                    .as_ref()
                    .is_ok_and(|l| l.public_ip == settings.public_ip)
        });
        if let Some((subnet, (Ok(existing), etcd_lease))) = mine {
            let lease = Lease {
                vni: config.vni,
                ..*existing
            };
            if lease != *existing {
                put(client, &settings.prefix, *subnet, &lease, *etcd_lease).await?;
            }
            return Ok(OwnLease {
                subnet: *subnet,
                lease,
                etcd_lease: *etcd_lease,
            });
        }
        let taken: BTreeSet<Ipv4Net> = leases.keys().copied().collect();
        let free: Vec<Ipv4Net> = config.candidates().filter(|s| !taken.contains(s)).collect();
        if free.is_empty() {
            return Err(SubnetError::Exhausted {
                network: config.network,
                min: config.subnet_min,
                max: config.subnet_max,
            });
        }
        let subnet = free[random_below(free.len())];
        let lease = Lease {
            public_ip: settings.public_ip,
            vni: config.vni,
            vtep_mac: vtep_mac_for(settings.public_ip),
        };
        if let Some(etcd_lease) = claim(client, &settings.prefix, subnet, &lease).await? {
            return Ok(OwnLease {
                subnet,
                lease,
                etcd_lease,
            });
        }
        // Another node took it between the listing and the transaction: look again.
    }
}

/// Creates `subnet`'s key with a fresh 24-hour etcd lease if it does not exist; returns the
/// etcd lease, or `None` when the key was there already.
async fn claim(
    client: &mut Client,
    prefix: &str,
    subnet: Ipv4Net,
    lease: &Lease,
) -> Result<Option<i64>, SubnetError> {
    let granted = client
        .lease_grant(LEASE_TTL.as_secs() as i64, None)
        .await?
        .id();
    let key = subnet_key(prefix, &subnet);
    let txn = Txn::new()
        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key.as_str(),
            lease.to_json(),
            Some(PutOptions::new().with_lease(granted)),
        )]);
    if client.txn(txn).await?.succeeded() {
        Ok(Some(granted))
    } else {
        client.lease_revoke(granted).await?;
        Ok(None)
    }
}

/// Writes `subnet`'s lease value, bound to `etcd_lease` (0: no TTL, a reservation).
async fn put(
    client: &mut Client,
    prefix: &str,
    subnet: Ipv4Net,
    lease: &Lease,
    etcd_lease: i64,
) -> Result<(), SubnetError> {
    let options = (etcd_lease != 0).then(|| PutOptions::new().with_lease(etcd_lease));
    client
        .put(subnet_key(prefix, &subnet), lease.to_json(), options)
        .await?;
    Ok(())
}

/// Keeps this node's lease alive for as long as the agent runs: renews the etcd lease every
/// hour, and re-creates the key (same subnet, fresh lease) if etcd lost it. `lost` wakes it at
/// once: the watch re-listed the leases without it (an etcd back with an empty data directory,
/// or one that expired the lease while this node could not reach it).
/// A failed attempt is retried every few seconds until it succeeds.
pub async fn keep_lease(mut client: Client, prefix: String, mut own: OwnLease, lost: Arc<Notify>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(RENEW_EVERY) => {}
            () = lost.notified() => {}
        }
        while let Err(e) = renew(&mut client, &prefix, &mut own).await {
            tracing::warn!(subnet = %own.subnet, "renewing the lease failed ({e}); retrying in {RENEW_RETRY:?}");
            tokio::time::sleep(RENEW_RETRY).await;
        }
    }
}

async fn renew(client: &mut Client, prefix: &str, own: &mut OwnLease) -> Result<(), SubnetError> {
    let key = subnet_key(prefix, &own.subnet);
    // Asked first because keep-alive fails outright on a lease etcd no longer has (expired, or
    // an etcd back with an empty data directory), which would never get to re-creating it;
    // such a lease reads as TTL -1.
    let alive =
        own.etcd_lease == 0 || client.lease_time_to_live(own.etcd_lease, None).await?.ttl() > 0;
    if alive && own.etcd_lease != 0 {
        client.lease_keep_alive(own.etcd_lease).await?;
    }
    let present = !client.get(key.as_str(), None).await?.kvs().is_empty();
    if !alive || !present {
        tracing::warn!(subnet = %own.subnet, "etcd lost this node's lease; re-creating it");
        match claim(client, prefix, own.subnet, &own.lease).await? {
            Some(etcd_lease) => {
                own.etcd_lease = etcd_lease;
                tracing::info!(subnet = %own.subnet, "re-created the lease");
            }
            None => tracing::warn!(
                subnet = %own.subnet,
                "the subnet's key was written again by someone else; leaving it as it is"
            ),
        }
    }
    Ok(())
}

/// Turns a listing into the model's leases: other nodes' valid vxlan leases with this
/// network's VNI. Returns the problems, for the log.
fn usable(
    listing: BTreeMap<Ipv4Net, (Result<Lease, LeaseError>, i64)>,
    own: &Ipv4Net,
    vni: u32,
) -> (BTreeMap<Ipv4Net, NodeLease>, Vec<String>) {
    let mut leases = BTreeMap::new();
    let mut problems = Vec::new();
    for (subnet, (lease, _)) in listing {
        if subnet == *own {
            continue;
        }
        match lease {
            Ok(lease) if lease.vni == vni => {
                leases.insert(subnet, node_lease(&lease));
            }
            Ok(lease) => problems.push(format!(
                "lease {subnet}: VNI {} is not this network's {vni}; ignored",
                lease.vni
            )),
            Err(e) => problems.push(format!("lease {subnet}: {e}; ignored")),
        }
    }
    (leases, problems)
}

fn node_lease(lease: &Lease) -> NodeLease {
    let Mac(vtep_mac) = lease.vtep_mac;
    NodeLease {
        public_ip: lease.public_ip,
        vtep_mac,
    }
}

/// What a listing found besides the other nodes' leases.
#[derive(Clone, Copy, Debug)]
pub struct Listed {
    /// The revision to watch from.
    pub revision: i64,
    /// Whether this node's own lease was there.
    pub own_present: bool,
}

/// Lists every lease into the model.
pub async fn load(
    client: &mut Client,
    prefix: &str,
    own: &Ipv4Net,
    vni: u32,
    model: &ModelHandle,
) -> Result<Listed, SubnetError> {
    let (listing, revision) = list(client, prefix).await?;
    let own_present = listing.contains_key(own);
    let (leases, problems) = usable(listing, own, vni);
    for problem in problems {
        tracing::warn!("{problem}");
    }
    tracing::info!(leases = leases.len(), "read the other nodes' leases");
    model.update(|m| m.replace_leases(leases));
    Ok(Listed {
        revision,
        own_present,
    })
}

/// Watches the leases into the model from `revision` on, re-listing when the watch falls
/// behind etcd's compaction or breaks, for as long as the agent runs. Wakes `lost` when a
/// listing lacks this node's own lease.
pub async fn watch(
    mut client: Client,
    prefix: String,
    own: Ipv4Net,
    vni: u32,
    mut revision: i64,
    model: Arc<ModelHandle>,
    lost: Arc<Notify>,
) {
    loop {
        match watch_from(&mut client, &prefix, &own, vni, revision, &model).await {
            Ok(()) => {}
            Err(e) => tracing::warn!("lease watch interrupted ({e}); re-listing"),
        }
        loop {
            match load(&mut client, &prefix, &own, vni, &model).await {
                Ok(listed) => {
                    tracing::info!("lease watch resumed");
                    if !listed.own_present {
                        tracing::warn!(subnet = %own, "this node's lease is missing from etcd (deleted, or etcd came back empty); re-creating it");
                        lost.notify_one();
                    }
                    revision = listed.revision;
                    break;
                }
                Err(e) => {
                    tracing::warn!(
                        "re-listing leases failed ({e}); the last known leases stay in use"
                    );
                    tokio::time::sleep(RETRY_EVERY).await;
                }
            }
        }
    }
}

/// One watch stream; returns when it ends (compaction, cancellation, a broken connection).
async fn watch_from(
    client: &mut Client,
    prefix: &str,
    own: &Ipv4Net,
    vni: u32,
    revision: i64,
    model: &ModelHandle,
) -> Result<(), SubnetError> {
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = client.watch(subnets_prefix(prefix), Some(options)).await?;
    while let Some(response) = stream.message().await? {
        if response.canceled() || response.compact_revision() > 0 {
            tracing::info!(
                compacted = response.compact_revision(),
                "lease watch fell behind compaction"
            );
            return Ok(());
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            apply_event(prefix, own, vni, event.event_type(), kv, model);
        }
    }
    Err(SubnetError::WatchEnded {
        prefix: prefix.to_owned(),
    })
}

fn apply_event(
    prefix: &str,
    own: &Ipv4Net,
    vni: u32,
    kind: EventType,
    kv: &KeyValue,
    model: &ModelHandle,
) {
    let Some(subnet) = std::str::from_utf8(kv.key())
        .ok()
        .and_then(|key| parse_subnet_key(prefix, key))
    else {
        return;
    };
    if subnet == *own {
        // Deleted by hand, it stays deleted until the next renewal: other nodes withdraw the
        // route, as an operator evicting the node means them to.
        if kind == EventType::Delete {
            tracing::warn!(%subnet, "this node's lease was deleted from etcd; it is re-created at the next renewal");
        }
        return;
    }
    match kind {
        EventType::Delete => {
            if model.update(|m| m.remove_lease(&subnet)) {
                tracing::info!(%subnet, "lease gone; route withdrawn");
            }
        }
        EventType::Put => match Lease::parse(&String::from_utf8_lossy(kv.value())) {
            Ok(lease) if lease.vni == vni => {
                if model.update(|m| m.set_lease(subnet, node_lease(&lease))) {
                    tracing::info!(%subnet, node = %lease.public_ip, "lease up");
                }
            }
            outcome => {
                tracing::warn!(%subnet, "unusable lease ({outcome:?}); ignored");
                model.update(|m| m.remove_lease(&subnet));
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(last: u8, vni: u32) -> Lease {
        Lease {
            public_ip: Ipv4Addr::new(192, 168, 50, last),
            vni,
            vtep_mac: vtep_mac_for(Ipv4Addr::new(192, 168, 50, last)),
        }
    }

    #[test]
    fn usable_leases_skip_our_own_foreign_vnis_and_garbage() {
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let listing = BTreeMap::from([
            (net("172.30.20.0/24"), (Ok(lease(1, 1)), 7)),
            (net("172.30.44.0/24"), (Ok(lease(2, 1)), 8)),
            (net("172.30.83.0/24"), (Ok(lease(3, 2)), 9)),
            (
                net("172.30.90.0/24"),
                (Err(LeaseError::Field { field: "PublicIP" }), 0),
            ),
        ]);
        let (leases, problems) = usable(listing, &net("172.30.20.0/24"), 1);
        assert_eq!(
            leases.keys().copied().collect::<Vec<_>>(),
            vec![net("172.30.44.0/24")]
        );
        assert_eq!(
            leases[&net("172.30.44.0/24")].public_ip,
            Ipv4Addr::new(192, 168, 50, 2)
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn random_below_stays_below() {
        for len in 1..50 {
            assert!(random_below(len) < len);
        }
    }
}
