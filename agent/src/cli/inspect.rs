//! `weft inspect`: the pinned maps in human terms (or JSON), without a running agent.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, path::PathBuf};

use clap::ValueEnum;
use serde::Serialize;
use weft::{
    datapath::conntrack::{Conntrack, monotonic_now_ns},
    datapath::maps::{AyaMaps, DatapathMaps as _, PinnedMaps, decode_name},
    sources::flannel::Mac,
    sources::objects::protocol_name,
};
use weft_common::{
    conntrack::{flags, moved_port, state_name},
    maps::{ServiceValue, ct_direction, endpoint_scope, service_flags},
};

#[derive(clap::Args)]
pub struct InspectArgs {
    /// What to show.
    #[arg(value_enum)]
    table: Table,
    /// The agent's pin directory.
    #[arg(long, env = "WEFT_PIN_DIR", default_value = "/sys/fs/bpf/weft")]
    pin_dir: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Clone, Copy, ValueEnum)]
enum Table {
    /// Service frontends: the endpoints each leads to and how it treats clients.
    Services,
    /// Every endpoint slot of every endpoint set.
    Backends,
    /// Tracked connections.
    Conntrack,
    /// Remote pod subnets (the other nodes' leases) and where they are reached.
    Subnets,
    /// Packets dropped, by reason.
    Drops,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Serialize)]
struct ServiceRow {
    service: String,
    frontend: String,
    protocol: &'static str,
    /// Endpoints new connections choose from (this node's only, for a `Local` policy).
    endpoints: u32,
    /// `cluster`, `node-local`, or `node-local+cluster` (a `Local` external policy: pods and
    /// the node use the cluster-wide set).
    scope: &'static str,
    masquerade_all: bool,
    affinity_timeout_seconds: u32,
    source_ranges: bool,
    /// Connections are rejected: the service port has no endpoints at all.
    reject: bool,
}

#[derive(Serialize)]
struct BackendRow {
    service: String,
    /// `cluster` or `node-local`.
    scope: &'static str,
    slot: u32,
    endpoint: String,
}

fn scope_name(scope: u8) -> &'static str {
    if scope == endpoint_scope::NODE_LOCAL {
        "node-local"
    } else {
        "cluster"
    }
}

/// The notes column of a frontend: what differs from a plain ClusterIP.
fn frontend_notes(row: &ServiceRow) -> String {
    let mut notes = Vec::new();
    if row.masquerade_all {
        notes.push("masquerade".to_owned());
    }
    if row.affinity_timeout_seconds != 0 {
        notes.push(format!("affinity {}s", row.affinity_timeout_seconds));
    }
    if row.source_ranges {
        notes.push("source-ranges".to_owned());
    }
    if row.reject {
        notes.push("reject".to_owned());
    }
    notes.join(",")
}

#[derive(Serialize)]
struct ConnectionRow {
    protocol: &'static str,
    client: String,
    frontend: String,
    endpoint: String,
    state: &'static str,
    idle_seconds: u64,
    masquerade: bool,
    /// The client's port as the endpoint sees it, when it was moved to keep this connection's
    /// tuple apart from another's.
    moved_port: Option<u16>,
}

#[derive(Serialize)]
struct SubnetRow {
    subnet: String,
    node: String,
    vtep_mac: String,
    /// Whether VXLAN from the node is accepted.
    member: bool,
    /// The MAC of the next hop towards the node, as the agent resolved it ("-": looked up per
    /// packet).
    next_hop: String,
}

#[derive(Serialize)]
struct DropRow {
    reason: &'static str,
    packets: u64,
}

fn address(addr: [u8; 4], port: u16) -> String {
    format!("{}:{port}", Ipv4Addr::from(addr))
}

pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let pin_dir = &args.pin_dir;
    let json = args.output == Format::Json;
    let output = match args.table {
        Table::Services | Table::Backends => {
            let dump = AyaMaps::open(&mut PinnedMaps::new(pin_dir))?.dump()?;
            let names: BTreeMap<u32, (String, u8)> = dump
                .names
                .iter()
                .map(|(id, name)| {
                    let (port, scope) = decode_name(name);
                    (*id, (port.to_string(), scope))
                })
                .collect();
            let name = |id: u32| {
                names
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| (format!("<id {id}>"), endpoint_scope::CLUSTER))
            };
            if matches!(args.table, Table::Services) {
                let mut rows: Vec<ServiceRow> = dump
                    .frontends
                    .iter()
                    .map(|(key, value): &(_, ServiceValue)| {
                        let (service, scope) = name(value.id);
                        let local_external = value.flags & service_flags::LOCAL_EXTERNAL != 0;
                        ServiceRow {
                            service,
                            frontend: address(key.addr, key.port),
                            protocol: protocol_name(key.proto),
                            endpoints: value.count,
                            scope: if local_external {
                                "node-local+cluster"
                            } else {
                                scope_name(scope)
                            },
                            masquerade_all: value.flags & service_flags::MASQUERADE_ALL != 0,
                            affinity_timeout_seconds: value.affinity_timeout_s,
                            source_ranges: value.flags & service_flags::SOURCE_RANGES != 0,
                            reject: value.flags & service_flags::REJECT != 0,
                        }
                    })
                    .collect();
                rows.sort_by(|a, b| (&a.service, &a.frontend).cmp(&(&b.service, &b.frontend)));
                render(
                    json,
                    &rows,
                    &[
                        "SERVICE",
                        "FRONTEND",
                        "PROTO",
                        "ENDPOINTS",
                        "SCOPE",
                        "NOTES",
                    ],
                    |r| {
                        vec![
                            r.service.clone(),
                            r.frontend.clone(),
                            r.protocol.into(),
                            r.endpoints.to_string(),
                            r.scope.into(),
                            frontend_notes(r),
                        ]
                    },
                )?
            } else {
                let mut rows: Vec<BackendRow> = dump
                    .endpoints
                    .iter()
                    .map(|(key, value)| {
                        let (service, scope) = name(key.service_id);
                        BackendRow {
                            service,
                            scope: scope_name(scope),
                            slot: key.slot,
                            endpoint: address(value.addr, value.port),
                        }
                    })
                    .collect();
                rows.sort_by(|a, b| {
                    (&a.service, a.scope, a.slot).cmp(&(&b.service, b.scope, b.slot))
                });
                render(json, &rows, &["SERVICE", "SET", "SLOT", "ENDPOINT"], |r| {
                    vec![
                        r.service.clone(),
                        r.scope.into(),
                        r.slot.to_string(),
                        r.endpoint.clone(),
                    ]
                })?
            }
        }
        Table::Conntrack => {
            let entries = Conntrack::open(&mut PinnedMaps::new(pin_dir))?.entries()?;
            let now = monotonic_now_ns();
            let mut rows: Vec<ConnectionRow> = entries
                .iter()
                .filter(|(key, _)| key.direction == ct_direction::FORWARD)
                .map(|(key, value)| ConnectionRow {
                    protocol: protocol_name(key.proto),
                    client: address(key.src_addr, key.src_port),
                    frontend: address(key.dst_addr, key.dst_port),
                    endpoint: address(value.nat_addr, value.nat_port),
                    state: state_name(key.proto, value.flags),
                    idle_seconds: now.saturating_sub(value.last_seen_ns) / 1_000_000_000,
                    masquerade: value.flags & flags::MASQUERADE != 0,
                    moved_port: (value.port_move != 0)
                        .then(|| moved_port(key.src_port, value.port_move)),
                })
                .collect();
            rows.sort_by(|a, b| (&a.frontend, &a.client).cmp(&(&b.frontend, &b.client)));
            render(
                json,
                &rows,
                &[
                    "PROTO", "CLIENT", "FRONTEND", "ENDPOINT", "STATE", "IDLE", "MASQ", "MOVED",
                ],
                |r| {
                    vec![
                        r.protocol.into(),
                        r.client.clone(),
                        r.frontend.clone(),
                        r.endpoint.clone(),
                        r.state.into(),
                        format!("{}s", r.idle_seconds),
                        if r.masquerade { "yes" } else { "no" }.into(),
                        r.moved_port
                            .map_or_else(|| "-".to_owned(), |port| format!("to :{port}")),
                    ]
                },
            )?
        }
        Table::Subnets => {
            let dump = AyaMaps::open(&mut PinnedMaps::new(pin_dir))?.dump()?;
            let members: std::collections::BTreeSet<Ipv4Addr> =
                dump.vteps.iter().map(|(ip, _)| *ip).collect();
            let rows: Vec<SubnetRow> = dump
                .subnets
                .iter()
                .map(|(subnet, node)| SubnetRow {
                    subnet: subnet.to_string(),
                    node: Ipv4Addr::from(node.public_ip).to_string(),
                    vtep_mac: Mac(node.vtep_mac).to_string(),
                    member: members.contains(&Ipv4Addr::from(node.public_ip)),
                    next_hop: if node.next_hop_ifindex == 0 {
                        "-".to_owned()
                    } else {
                        Mac(node.next_hop_mac).to_string()
                    },
                })
                .collect();
            render(
                json,
                &rows,
                &["SUBNET", "NODE", "VTEP MAC", "MEMBER", "NEXT HOP"],
                |r| {
                    vec![
                        r.subnet.clone(),
                        r.node.clone(),
                        r.vtep_mac.clone(),
                        if r.member { "yes" } else { "no" }.into(),
                        r.next_hop.clone(),
                    ]
                },
            )?
        }
        Table::Drops => {
            let rows: Vec<DropRow> = PinnedMaps::new(pin_dir)
                .drop_counts()?
                .into_iter()
                .map(|(reason, packets)| DropRow {
                    reason: reason.name(),
                    packets,
                })
                .collect();
            render(json, &rows, &["REASON", "PACKETS"], |r| {
                vec![r.reason.into(), r.packets.to_string()]
            })?
        }
    };
    print!("{output}");
    Ok(())
}

/// Rows as JSON, or as an aligned table with a header.
fn render<T: Serialize>(
    json: bool,
    rows: &[T],
    header: &[&str],
    cells: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<String> {
    if json {
        return Ok(serde_json::to_string_pretty(rows)? + "\n");
    }
    let lines: Vec<Vec<String>> = std::iter::once(header.iter().map(|h| (*h).to_owned()).collect())
        .chain(rows.iter().map(cells))
        .collect();
    let mut widths = vec![0; header.len()];
    for line in &lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    for line in &lines {
        let mut text = String::new();
        for (cell, width) in line.iter().zip(&widths) {
            write!(text, "{cell:<width$}  ")?;
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    Ok(out)
}
