//! The Node package (`bindings/node`): its addon is built with cargo, and
//! its own suites run under `node --test` — the API, host-driven sessions,
//! process lifetime, and the seeds' scenarios through the Baileys adapter
//! against a Baileys-shaped fake — then its types are checked with `tsc`
//! against an example. CI installs Node and requires all of it.

use std::path::Path;
use std::process::Command;

fn run(what: &str, cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_node_package_passes_its_own_suites() {
    let has_node = Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(has_node || std::env::var_os("CI").is_none(), "CI must have Node (.ci/run installs it)");
    if !has_node {
        eprintln!("node not found: the Node package's suites are not run here");
        return;
    }
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("bindings/node");
    // The addon, built in this workspace's target directory (debug: what `cargo test` built is reused).
    run("building the addon", Command::new("node").arg("scripts/build.mjs").current_dir(&package));
    run(
        "node --test",
        Command::new("node")
            .args(["--test", "--test-concurrency=2", "test/"])
            .env("INSTANCE_LIFECYCLE_CLI", env!("CARGO_BIN_EXE_lifecycle"))
            .current_dir(&package),
    );
    let tsc = package.join("node_modules/typescript/bin/tsc");
    if !tsc.exists() {
        let npm = Command::new("npm")
            .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
            .current_dir(&package)
            .output();
        let installed = npm.as_ref().is_ok_and(|o| o.status.success());
        assert!(installed || std::env::var_os("CI").is_none(), "CI must install TypeScript from npm: {npm:?}");
        if !installed {
            eprintln!("typescript could not be installed from npm: index.d.ts is not type-checked here");
            return;
        }
    }
    run(
        "tsc against examples/host.ts",
        Command::new("node").arg(&tsc).args(["-p", "tsconfig.json"]).current_dir(&package),
    );
}
