//! Linker arguments for the eBPF object.

fn main() {
    // bpf-linker asks LLVM to expand memcpy "in order" by default, which leaves every memset
    // as a call to a helper subprogram. Kernels before 5.12 count at least 32 bytes of stack
    // for any subprogram, so each such call costs a program 32 of its 512 bytes (5.10 refused
    // tc_from_pods for it). Expanded the generic way, memset and small memcpy are plain stores.
    println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
}
