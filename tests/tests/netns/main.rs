//! The namespace tier: clusters made of network namespaces with real agents, a real etcd, a
//! test API server and real traffic, plus the deploy manifests checked against the agent. One
//! binary, a module per subject; every test names its namespaces uniquely, so they run in
//! parallel.

mod capacity;
mod cni;
mod deploy_manifests;
mod e2e;
mod etcd;
mod kernel;
mod kube;
mod kube_proxy;
mod kube_subnets;
mod kubectl;
mod mount;
mod outage;
mod overlay;
mod restart;
mod security;
mod services;
mod trace;
