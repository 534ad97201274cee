//! Link settings for the `ficus` binary.
//!
//! Relative relocations are packed (`DT_RELR`): as a position-independent executable (ASLR)
//! ficus carries ~90k relative relocations, 1.4 MB as classic `RELA` entries that the loader
//! reads at every start, which showed up as idle RSS; packed they take a few KB. It needs
//! GNU ld 2.38+ or lld to build (older linkers ignore the option with a warning) and glibc 2.36+
//! to run (Debian 12, Ubuntu 24.04, RHEL 10 and later; the image is Debian 12).

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
