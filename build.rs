//! Build script: records the target triple so `edgekeeper version` can print it.
fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=EDGEKEEPER_TARGET={target}");
    println!("cargo:rerun-if-changed=build.rs");
}
