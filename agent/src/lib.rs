//! weft's agent, as a library: what the `weft` binary wires together, and what the test tiers
//! drive directly (the fixture tests fill maps through [`reconcile`] exactly as the agent does).
//!
//! Data flows one way:
//! - [`sources`] (manifests, the Kubernetes API, flannel's etcd leases, next hops, pods) update
//!   the pure [`model`] through a [`sources::ModelHandle`];
//! - the [`reconcile::Reconciler`] alone writes the maps ([`datapath::maps`]);
//! - [`datapath`] loads and attaches the eBPF programs and reads what they keep (conntrack);
//! - [`host`] is the node around them (links, routes, nftables, capabilities, raw syscalls);
//! - [`serve`] answers HTTP (health, health-check NodePorts, metrics);
//! - [`node`] is a node's life: its [`node::Config`], its bootstrap, and its supervised tasks.
#![deny(unsafe_code)]

pub mod datapath;
pub mod host;
pub mod model;
pub mod node;
pub mod reconcile;
pub mod serve;
pub mod sources;
