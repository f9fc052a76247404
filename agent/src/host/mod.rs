//! The node around the datapath: its links, addresses and routes ([`netdev`]), weft's nftables
//! table ([`nft`]), what kube-proxy left behind ([`kube_proxy`]), the capabilities the agent
//! needs ([`privilege`]), the node's own tools that both run ([`command`]), and the raw system
//! calls no safe wrapper offers ([`sys`]).

pub mod command;
pub mod kube_proxy;
pub mod netdev;
pub mod nft;
pub mod privilege;
pub mod sys;
