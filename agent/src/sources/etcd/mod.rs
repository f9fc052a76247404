//! The etcd source: flannel's subnet manager, speaking flannel's etcd v3 schema (see
//! [`crate::sources::flannel`]). It reads the network config, takes this node's lease (the entry that
//! carries its PublicIP, a reservation included, rewritten with this node's attributes; else a
//! free subnet claimed with a create-if-absent transaction), keeps the lease alive, and
//! watches every node's lease into the model.

pub mod client;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    convert::Infallible,
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
    model::NodeLease,
    sources::ModelHandle,
    sources::flannel::{
        Lease, LeaseAttrs, LeaseError, NetworkConfig, NotPeer, Skipped, config_key, parse_config,
        parse_subnet_key, subnet_key, subnets_prefix, vtep_mac_for,
    },
};

/// flannel's lease time to live: 24 hours.
pub const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often the lease is renewed: well before it could expire.
const RENEW_EVERY: Duration = Duration::from_secs(3600);
impl From<etcd_client::Error> for SubnetError {
    fn from(error: etcd_client::Error) -> Self {
        Self::Etcd(error)
    }
}

/// How long to wait before trying etcd again after a failure.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How long to wait before renewing (or re-creating) the lease again after a failure.
const RENEW_RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SubnetError {
    // The cause is in the message (with advice), so it is not also a `source`: logs print this
    // with `{}`, and a chain would print it twice.
    #[error("etcd request failed: {}", crate::sources::etcd::client::describe(.0))]
    Etcd(etcd_client::Error),
    #[error(
        "{key} is missing: write the network config there, e.g. \
             {{\"Network\":\"10.244.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}"
    )]
    MissingConfig { key: String },
    #[error("{key}: {problem}")]
    BadConfig {
        key: String,
        problem: crate::sources::flannel::ConfigError,
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
    /// The subnet this node's last `subnet.env` names, tried first when no entry carries its
    /// PublicIP (see [`crate::sources::flannel::previous_subnet`]).
    pub previous: Option<Ipv4Net>,
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
    parse_config(&text).map_err(|problem| SubnetError::BadConfig { key, problem })
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

/// One entry under `<prefix>/subnets/`, as listed.
#[derive(Clone, Debug)]
struct Entry {
    key: String,
    subnet: Ipv4Net,
    attrs: Result<LeaseAttrs, LeaseError>,
    /// The etcd lease the key is bound to; 0 for a reservation (a key without TTL).
    etcd_lease: i64,
    /// The key's last write, so a rewrite cannot overwrite a concurrent writer's.
    mod_revision: i64,
}

impl Entry {
    /// Whether the entry carries `public_ip`: flanneld's sign that it is that node's.
    fn is_of(&self, public_ip: Ipv4Addr) -> bool {
        self.attrs.as_ref().is_ok_and(|a| a.public_ip == public_ip)
    }

    /// Whether this node may hold it under `config`: a subnet the config hands out, under an
    /// IPv4-only key (a dual-stack key, `…&fc00::-64`, is for a node with IPv6 enabled).
    fn fits(&self, prefix: &str, config: &NetworkConfig) -> bool {
        config.holds(&self.subnet) && self.key == subnet_key(prefix, &self.subnet)
    }

    fn is_reservation(&self) -> bool {
        self.etcd_lease == 0
    }
}

/// Every entry under the prefix, and the revision they were read at.
async fn list(client: &mut Client, prefix: &str) -> Result<(Vec<Entry>, i64), SubnetError> {
    let response = client
        .get(
            subnets_prefix(prefix),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    let revision = response.header().map_or(0, |h| h.revision());
    let entries = response
        .kvs()
        .iter()
        .filter_map(|kv| {
            let key = std::str::from_utf8(kv.key()).ok()?;
            Some(Entry {
                key: key.to_owned(),
                subnet: parse_subnet_key(prefix, key)?,
                attrs: LeaseAttrs::parse(&String::from_utf8_lossy(kv.value())),
                etcd_lease: kv.lease(),
                mod_revision: kv.mod_revision(),
            })
        })
        .collect();
    Ok((entries, revision))
}

/// A random index below `len` (flannel picks a random free subnet, so racing nodes rarely
/// reach for the same one).
fn random_below(len: usize) -> usize {
    (RandomState::new().hash_one(std::process::id()) % len as u64) as usize
}

/// Takes this node's lease as flanneld does: the entry that carries its PublicIP (a restart
/// keeps its subnet; an operator's reservation, even one with only `PublicIP` in it, is taken
/// first), rewritten with this node's attributes; else a free subnet (the one in its last
/// `subnet.env` if that is free, so a node whose lease expired keeps its pods' addresses)
/// claimed with a transaction that only creates an absent key, so two nodes racing for one subnet cannot
/// both win. Entries with its PublicIP that the config no longer allows are given up: a
/// leased one deleted (as flanneld does), a reservation left to its operator.
pub async fn acquire(
    client: &mut Client,
    settings: &SubnetSettings,
    config: &NetworkConfig,
) -> Result<OwnLease, SubnetError> {
    let prefix = settings.prefix.as_str();
    let lease = Lease {
        public_ip: settings.public_ip,
        vni: config.vni,
        vtep_mac: vtep_mac_for(settings.public_ip),
    };
    if let Some(previous) = settings.previous.filter(|subnet| !config.holds(subnet)) {
        tracing::warn!(
            %previous,
            "the subnet in subnet.env is not one the network config hands out; ignored"
        );
    }
    loop {
        let (entries, _) = list(client, prefix).await?;
        let ours: Vec<&Entry> = entries
            .iter()
            .filter(|entry| entry.is_of(settings.public_ip))
            .collect();
        // A reservation first: the operator's choice for this node.
        let chosen = ours
            .iter()
            .filter(|entry| entry.fits(prefix, config))
            .min_by_key(|entry| (!entry.is_reservation(), entry.subnet))
            .copied();
        let unfit = format!(
            "not one of the config's /{} subnets {}..{} of {} under an IPv4-only key",
            config.subnet_len, config.subnet_min, config.subnet_max, config.network
        );
        let mut deleted = false;
        for entry in ours {
            if chosen.is_some_and(|chosen| chosen.key == entry.key) {
                continue;
            }
            let why = if entry.fits(prefix, config) {
                "this node holds another entry"
            } else {
                unfit.as_str()
            };
            deleted |= give_up(client, entry, why).await?;
        }
        if let Some(entry) = chosen {
            match take(client, entry, &lease).await? {
                Some(etcd_lease) => {
                    return Ok(OwnLease {
                        subnet: entry.subnet,
                        lease,
                        etcd_lease,
                    });
                }
                // Written by someone else since the listing: look again.
                None => continue,
            }
        }
        if deleted {
            // What was deleted is free now: look again.
            continue;
        }
        let free = free_subnets(config, entries.iter().map(|entry| entry.subnet));
        if free.is_empty() {
            return Err(SubnetError::Exhausted {
                network: config.network,
                min: config.subnet_min,
                max: config.subnet_max,
            });
        }
        let previous = settings.previous.filter(|subnet| free.contains(subnet));
        let subnet = previous.unwrap_or_else(|| free[random_below(free.len())]);
        if previous.is_some() {
            tracing::info!(%subnet, "claiming the subnet this node held before (subnet.env)");
        }
        if let Some(etcd_lease) = claim(client, prefix, subnet, &lease).await? {
            return Ok(OwnLease {
                subnet,
                lease,
                etcd_lease,
            });
        }
        // Another node took it between the listing and the transaction: look again.
    }
}

/// The config's subnets that overlap no entry, as flanneld picks them: an entry of another
/// length (a /25 reservation, a lease from an older config) keeps the subnets it overlaps
/// from being claimed.
fn free_subnets(config: &NetworkConfig, taken: impl Iterator<Item = Ipv4Net>) -> Vec<Ipv4Net> {
    let len = config.subnet_len;
    let mut within = HashSet::new();
    let mut exact_or_wider = HashSet::new();
    for subnet in taken {
        if subnet.prefix_len() > len {
            within.insert(
                Ipv4Net::new(subnet.network(), len)
                    .expect("shorter prefix")
                    .trunc(),
            );
        } else {
            exact_or_wider.insert(subnet);
        }
    }
    config
        .candidates()
        .filter(|candidate| {
            !within.contains(candidate)
                && !(0..=len).any(|wider| {
                    let net = Ipv4Net::new(candidate.network(), wider).expect("valid length");
                    exact_or_wider.contains(&net.trunc())
                })
        })
        .collect()
}

/// Makes `entry` this node's lease, as flanneld does on reuse: a leased key is bound to a
/// fresh 24-hour etcd lease, a reservation stays without TTL, and the value becomes `lease`
/// in flannel's JSON when its attributes differ (another VtepMAC, VNI or backend, or none
/// yet). The write happens only if the key is as listed. Returns the etcd lease (0 for a
/// reservation), or `None` when the key changed meanwhile.
async fn take(
    client: &mut Client,
    entry: &Entry,
    lease: &Lease,
) -> Result<Option<i64>, SubnetError> {
    let stored = entry.attrs.as_ref().ok().map(|attrs| &attrs.vxlan);
    let current = stored == Some(&Ok(*lease));
    if entry.is_reservation() {
        if current {
            tracing::info!(key = entry.key, "taking this node's reservation");
            return Ok(Some(0));
        }
        let written = write_if_unchanged(client, entry, lease, None).await?;
        if written {
            tracing::info!(key = entry.key, was = ?stored, "took this node's reservation and wrote its attributes into it");
        }
        return Ok(written.then_some(0));
    }
    let granted = client
        .lease_grant(LEASE_TTL.as_secs() as i64, None)
        .await?
        .id();
    if !write_if_unchanged(client, entry, lease, Some(granted)).await? {
        client.lease_revoke(granted).await?;
        return Ok(None);
    }
    if !current {
        tracing::info!(key = entry.key, was = ?stored, "rewrote this node's lease with its own attributes");
    }
    // The previous etcd lease is left to expire, as flanneld leaves it: revoking it would take
    // any other key bound to it along.
    Ok(Some(granted))
}

/// Writes `lease` to `entry`'s key, bound to `etcd_lease` (none: no TTL), if nobody wrote the
/// key since it was listed.
async fn write_if_unchanged(
    client: &mut Client,
    entry: &Entry,
    lease: &Lease,
    etcd_lease: Option<i64>,
) -> Result<bool, SubnetError> {
    let options = etcd_lease.map(|id| PutOptions::new().with_lease(id));
    let put = TxnOp::put(entry.key.as_str(), lease.to_json(), options);
    Ok(client.txn(if_unchanged(entry, put)).await?.succeeded())
}

/// A transaction doing `op` only if `entry`'s key was not written since it was listed.
fn if_unchanged(entry: &Entry, op: TxnOp) -> Txn {
    Txn::new()
        .when([Compare::mod_revision(
            entry.key.as_str(),
            CompareOp::Equal,
            entry.mod_revision,
        )])
        .and_then([op])
}

/// An entry with this node's PublicIP that it will not hold: one the network config does not
/// allow it (another subnet length or range, or a dual-stack key), or a second one besides the
/// entry it takes, which would route another subnet to this node (`why` says which). A leased one is
/// deleted, as flanneld deletes an unfit one, unless it changed since the listing; a
/// reservation is the operator's and stays. Returns whether it deleted it.
async fn give_up(client: &mut Client, entry: &Entry, why: &str) -> Result<bool, SubnetError> {
    if entry.is_reservation() {
        tracing::warn!(
            key = entry.key,
            "this node's reservation is left in place, unused: {why}; correct or delete it"
        );
        return Ok(false);
    }
    let delete = TxnOp::delete(entry.key.as_str(), None);
    let deleted = client.txn(if_unchanged(entry, delete)).await?.succeeded();
    if deleted {
        tracing::info!(
            key = entry.key,
            "deleted a lease with this node's PublicIP: {why}"
        );
    }
    Ok(deleted)
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

/// Keeps this node's lease alive for as long as the agent runs: renews the etcd lease every
/// hour, and re-creates the key (same subnet, fresh lease) if etcd lost it. `lost` wakes it at
/// once: the watch re-listed the leases without it (an etcd back with an empty data directory,
/// or one that expired the lease while this node could not reach it).
/// A failed attempt is retried every few seconds until it succeeds.
pub async fn keep_lease(
    mut client: Client,
    prefix: String,
    mut own: OwnLease,
    lost: Arc<Notify>,
) -> Infallible {
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

/// Who the peers are: this node's address (its other entries are no peer) and the network's VNI.
#[derive(Clone, Copy, Debug)]
struct Network {
    public_ip: Ipv4Addr,
    vni: u32,
}

/// The peer an entry describes on `network`.
fn peer(attrs: Result<LeaseAttrs, LeaseError>, network: Network) -> Result<NodeLease, NotPeer> {
    let attrs = attrs?;
    if attrs.public_ip == network.public_ip {
        return Err(NotPeer::ThisNode);
    }
    attrs.vxlan?.peer_on(network.vni)
}

/// A listing's peers (every entry but `own`'s); the rest is skipped.
fn peers(
    entries: Vec<Entry>,
    own: &Ipv4Net,
    network: Network,
    skipped: &mut Skipped<Ipv4Net>,
) -> BTreeMap<Ipv4Net, NodeLease> {
    let listed: BTreeSet<Ipv4Net> = entries.iter().map(|entry| entry.subnet).collect();
    skipped.retain_listed(|subnet| listed.contains(subnet));
    let mut leases = BTreeMap::new();
    for entry in entries {
        if entry.subnet == *own {
            continue;
        }
        match peer(entry.attrs, network) {
            Ok(lease) => {
                skipped.clear(&entry.subnet);
                leases.insert(entry.subnet, lease);
            }
            Err(why) => {
                skipped.skip(&entry.subnet, why);
            }
        }
    }
    leases
}

/// The other nodes' leases, followed into the model: their valid vxlan leases with this
/// network's VNI are peers, every other entry is skipped (a reservation until its node takes
/// it, another backend's, junk).
pub struct Peers {
    client: Client,
    prefix: String,
    own: Ipv4Net,
    network: Network,
    model: Arc<ModelHandle>,
    skipped: Skipped<Ipv4Net>,
}

/// What a listing found besides the other nodes' leases.
#[derive(Clone, Copy, Debug)]
pub struct Listed {
    /// The revision to watch from.
    pub revision: i64,
    /// Whether this node's own lease was there.
    pub own_present: bool,
}

impl Peers {
    #[must_use]
    pub fn new(
        client: Client,
        prefix: String,
        own: &OwnLease,
        vni: u32,
        model: Arc<ModelHandle>,
    ) -> Self {
        Self {
            client,
            prefix,
            own: own.subnet,
            network: Network {
                public_ip: own.lease.public_ip,
                vni,
            },
            model,
            skipped: Skipped::default(),
        }
    }

    /// Lists every lease into the model.
    pub async fn load(&mut self) -> Result<Listed, SubnetError> {
        let (entries, revision) = list(&mut self.client, &self.prefix).await?;
        let own_present = entries.iter().any(|entry| entry.subnet == self.own);
        let leases = peers(entries, &self.own, self.network, &mut self.skipped);
        tracing::info!(leases = leases.len(), "read the other nodes' leases");
        self.model.update(|m| m.replace_leases(leases));
        Ok(Listed {
            revision,
            own_present,
        })
    }

    /// Watches the leases into the model from `revision` on, re-listing when the watch falls
    /// behind etcd's compaction or breaks, for as long as the agent runs. Wakes `lost` when a
    /// listing lacks this node's own lease.
    pub async fn watch(mut self, mut revision: i64, lost: Arc<Notify>) -> Infallible {
        loop {
            match self.watch_from(revision).await {
                Ok(()) => {}
                Err(e) => tracing::warn!("lease watch interrupted ({e}); re-listing"),
            }
            loop {
                match self.load().await {
                    Ok(listed) => {
                        tracing::info!("lease watch resumed");
                        if !listed.own_present {
                            tracing::warn!(subnet = %self.own, "this node's lease is missing from etcd (deleted, or etcd came back empty); re-creating it");
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
    async fn watch_from(&mut self, revision: i64) -> Result<(), SubnetError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut stream = self
            .client
            .watch(subnets_prefix(&self.prefix), Some(options))
            .await?;
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
                self.apply(event.event_type(), kv);
            }
        }
        Err(SubnetError::WatchEnded {
            prefix: self.prefix.clone(),
        })
    }

    fn apply(&mut self, kind: EventType, kv: &KeyValue) {
        let Some(subnet) = std::str::from_utf8(kv.key())
            .ok()
            .and_then(|key| parse_subnet_key(&self.prefix, key))
        else {
            return;
        };
        if subnet == self.own {
            // Deleted by hand, it stays deleted until the next renewal: other nodes withdraw
            // the route, as an operator evicting the node means them to.
            if kind == EventType::Delete {
                tracing::warn!(%subnet, "this node's lease was deleted from etcd; it is re-created at the next renewal");
            }
            return;
        }
        let outcome = match kind {
            EventType::Delete => {
                self.skipped.clear(&subnet);
                None
            }
            EventType::Put => {
                match peer(
                    LeaseAttrs::parse(&String::from_utf8_lossy(kv.value())),
                    self.network,
                ) {
                    Ok(lease) => {
                        self.skipped.clear(&subnet);
                        Some(lease)
                    }
                    Err(why) => {
                        self.skipped.skip(&subnet, why);
                        None
                    }
                }
            }
        };
        match outcome {
            Some(lease) => {
                if self.model.update(|m| m.set_lease(subnet, lease)) {
                    tracing::info!(%subnet, node = %lease.public_ip, "lease up");
                }
            }
            None => {
                if self.model.update(|m| m.remove_lease(&subnet)) {
                    tracing::info!(%subnet, "lease gone; route withdrawn");
                }
            }
        }
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

    fn entry(subnet: &str, value: &str) -> Entry {
        let subnet: Ipv4Net = subnet.parse().unwrap();
        Entry {
            key: subnet_key("/coreos.com/network", &subnet),
            subnet,
            attrs: LeaseAttrs::parse(value),
            etcd_lease: 0,
            mod_revision: 1,
        }
    }

    #[test]
    fn peers_are_other_nodes_vxlan_leases_and_the_rest_is_said_once() {
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let listing = |reservation: &str| {
            vec![
                entry("172.30.20.0/24", &lease(1, 1).to_json()),
                entry("172.30.44.0/24", &lease(2, 1).to_json()),
                entry("172.30.83.0/24", &lease(3, 2).to_json()),
                entry("172.30.90.0/24", r#"{"PublicIP":"192.168.50.4"#),
                entry("172.30.91.0/24", reservation),
                // A stale lease of this node's own besides the one it holds.
                entry("172.30.95.0/24", &lease(1, 1).to_json()),
            ]
        };
        let network = Network {
            public_ip: Ipv4Addr::new(192, 168, 50, 1),
            vni: 1,
        };
        let mut skipped = Skipped::default();
        let reservation = r#"{"PublicIP":"192.168.50.5"}"#;
        let leases = peers(
            listing(reservation),
            &net("172.30.20.0/24"),
            network,
            &mut skipped,
        );
        assert_eq!(
            leases.keys().copied().collect::<Vec<_>>(),
            vec![net("172.30.44.0/24")]
        );
        assert_eq!(
            leases[&net("172.30.44.0/24")].public_ip,
            Ipv4Addr::new(192, 168, 50, 2)
        );
        assert_eq!(
            skipped.0.get(&net("172.30.91.0/24")),
            Some(&NotPeer::Lease(LeaseError::NoBackendData))
        );
        assert_eq!(
            skipped.0.get(&net("172.30.83.0/24")),
            Some(&NotPeer::OtherVni(2, 1))
        );
        assert_eq!(
            skipped.0.get(&net("172.30.95.0/24")),
            Some(&NotPeer::ThisNode)
        );
        assert_eq!(skipped.0.len(), 4, "{skipped:?}");
        // Listed again, nothing new is said.
        assert!(!skipped.skip(
            &net("172.30.91.0/24"),
            NotPeer::Lease(LeaseError::NoBackendData)
        ));
        // Once the reserving node fills its entry in, it is a peer; gone entries are forgotten.
        let mut filled = listing(&lease(5, 1).to_json());
        filled.retain(|entry| entry.subnet != net("172.30.83.0/24"));
        let leases = peers(filled, &net("172.30.20.0/24"), network, &mut skipped);
        assert!(leases.contains_key(&net("172.30.91.0/24")));
        assert_eq!(
            skipped.0.keys().copied().collect::<Vec<_>>(),
            vec![net("172.30.90.0/24"), net("172.30.95.0/24")]
        );
    }

    #[test]
    fn an_entry_is_this_nodes_by_its_public_ip_and_fits_only_the_configs_subnets() {
        let config = crate::sources::flannel::parse_config(
            r#"{"Network":"172.30.0.0/16","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        let prefix = "/coreos.com/network";
        let ip = Ipv4Addr::new(192, 168, 50, 5);
        let reservation = entry("172.30.20.0/24", r#"{"PublicIP":"192.168.50.5"}"#);
        assert!(reservation.is_of(ip) && reservation.fits(prefix, &config));
        assert!(!entry("172.30.20.0/24", &lease(6, 1).to_json()).is_of(ip));
        assert!(!entry("172.30.20.0/24", "junk").is_of(ip));
        let other_length = entry("172.30.20.0/25", r#"{"PublicIP":"192.168.50.5"}"#);
        assert!(!other_length.fits(prefix, &config));
        let dual_stack = Entry {
            key: format!("{prefix}/subnets/172.30.20.0-24&fc00::-64"),
            ..reservation.clone()
        };
        assert!(!dual_stack.fits(prefix, &config));
    }

    #[test]
    fn free_subnets_overlap_no_entry_of_any_length() {
        let config = crate::sources::flannel::parse_config(
            r#"{"Network":"10.99.0.0/16","SubnetMin":"10.99.1.0","SubnetMax":"10.99.6.0","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        let taken = [
            "10.99.1.0/24",
            "10.99.2.128/25",
            "10.99.4.0/23",
            "10.98.0.0/24",
        ]
        .map(|s| s.parse::<Ipv4Net>().unwrap());
        let free: Vec<String> = free_subnets(&config, taken.into_iter())
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(free, ["10.99.3.0/24", "10.99.6.0/24"]);
        let everything = ["10.99.0.0/16".parse().unwrap()];
        assert!(free_subnets(&config, everything.into_iter()).is_empty());
    }

    #[test]
    fn random_below_stays_below() {
        for len in 1..50 {
            assert!(random_below(len) < len);
        }
    }
}
