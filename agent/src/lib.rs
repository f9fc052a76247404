//! weft's agent, as a library: the building blocks the `weft` binary wires together, and that
//! the test tiers drive directly (the fixture tests fill maps through [`reconcile`] exactly as
//! the agent does).
//!
//! Data flows one way: sources ([`manifests`], [`kube`], [`subnets`], [`nexthops`], [`pods`]) update the pure [`model`] through a
//! [`source::ModelHandle`]; the [`reconcile::Reconciler`] alone writes the service maps
//! ([`maps`]); [`dataplane`] loads and attaches the eBPF programs.
#![deny(unsafe_code)]

pub mod conntrack;
pub mod dataplane;
pub mod etcd;
pub mod flannel;
#[cfg(test)]
mod fuzz;
pub mod health;
pub mod http;
pub mod kube;
pub mod links;
pub mod manifests;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod netdev;
pub mod nexthops;
pub mod nft;
pub mod node;
pub mod objects;
pub mod pods;
pub mod privilege;
pub mod probe;
pub mod reconcile;
pub mod source;
pub mod subnets;
pub mod sys;
