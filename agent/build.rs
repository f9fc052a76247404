//! Builds the eBPF programs (`dataplane-ebpf/`) for `bpfel-unknown-none` and leaves the object in
//! `OUT_DIR`, where `weft::datapath::loader::OBJECT` embeds it.
//!
//! The eBPF crate is compiled by a second cargo with the Debian `rustc-web` toolchain at `/usr`
//! (set `WEFT_EBPF_TOOLCHAIN` to use another), because that toolchain ships a prebuilt `core`
//! for BPF and needs no nightly. `cargo xtask setup` installs it.

use std::{env, path::Path};

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=WEFT_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=RUSTC_BOOTSTRAP");
    let toolchain = env::var("WEFT_EBPF_TOOLCHAIN").unwrap_or_else(|_| "/usr".to_owned());
    if env::var_os("RUSTC_BOOTSTRAP").is_none() {
        // aya-ebpf uses `asm_experimental_arch`; allow it for that crate alone. `=1` would make
        // aya-build ask for `-Z build-std`, which needs a rust-src the toolchain does not have.
        // SAFETY: build scripts are single-threaded; nothing reads the environment concurrently.
        unsafe { env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf") };
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dataplane-ebpf");
    let root = root
        .canonicalize()
        .with_context(|| format!("finding the eBPF crate at {}", root.display()))?;
    let root = root
        .to_str()
        .context("the eBPF crate's path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "weft-dataplane-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .context(
        "building the eBPF programs; run `cargo xtask setup` (as root) to install the toolchain",
    )
}
