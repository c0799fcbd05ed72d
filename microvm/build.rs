//! Tells the tests whether this host can run QEMU: `tests/qemu_boot.rs` is compiled with its
//! tests `#[ignore]`d (listed as ignored, with the reason) where `qemu-system-x86_64` is not
//! on PATH, instead of passing without having run.

fn main() {
    println!("cargo:rustc-check-cfg=cfg(thaw_no_qemu)");
    println!("cargo:rerun-if-env-changed=PATH");
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join("qemu-system-x86_64").is_file())
    });
    if !found {
        println!("cargo:rustc-cfg=thaw_no_qemu");
    }
}
