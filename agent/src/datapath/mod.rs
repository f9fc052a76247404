//! The eBPF side as the agent sees it: loading and attaching the programs ([`loader`]), their
//! pinned attachments ([`links`]), the maps the reconciler writes ([`maps`]), the connection
//! tracking they keep ([`conntrack`]), and `weft trace`'s probe packets ([`probe`]).

pub mod conntrack;
pub mod links;
pub mod loader;
pub mod maps;
pub mod probe;
