#!/usr/bin/env bash
# The namespace and fixture tiers on this VM's kernel, as root: what `cargo xtask test` runs,
# without the lints, the bench and the nested kernel matrix.
set -euo pipefail
export PATH=/root/.cargo/bin:$PATH
cd /weft
cargo build --workspace --bins --locked
upgrade=$(cargo xtask upgrade-object | tail -n1)
WEFT_BIN=$PWD/target/debug/weft WEFT_UPGRADE_OBJECT=$upgrade cargo test --workspace --locked
