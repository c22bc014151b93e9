//! Lays out the functions the daemon runs next to each other in release builds (x86-64 Linux,
//! where rustc links with rust-lld): `link/hot-symbols.txt`, made by `link/hot-symbols.sh`, is the
//! linker's symbol ordering file. The daemon's resident memory is mostly its code pages, and the
//! kernel maps 64 KiB around each page fault, so hot code spread over the binary costs far more
//! memory than the same code packed together. Names the file lists that no longer exist are
//! skipped; `FOREMAN_SYMBOL_ORDER=0` turns the ordering off (a linker other than lld needs that).

fn main() {
    println!("cargo:rerun-if-changed=link/hot-symbols.txt");
    println!("cargo:rerun-if-env-changed=FOREMAN_SYMBOL_ORDER");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let wanted = var("FOREMAN_SYMBOL_ORDER") != "0";
    let release = var("PROFILE") == "release";
    let lld_target = var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_ENV") == "gnu";
    if wanted && release && lld_target {
        let file = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join("link/hot-symbols.txt");
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            file.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
