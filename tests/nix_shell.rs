//! sandrun inside a `nix develop` shell: the flake evaluates, and host steps (no
//! `image`) run the invoking shell's own tools and see its environment, which is what a
//! development shell is for.

mod prereq;
mod support;

use std::path::Path;
use std::process::Command;

use support::{modes, Sandbox};

/// The flake parses (Debian's nix-bin cannot fetch nixpkgs here, so `nix flake check`
/// is for machines that can; a syntax or structure slip is caught everywhere).
#[test]
fn flake_parses() {
    let flake = Path::new(env!("CARGO_MANIFEST_DIR")).join("flake.nix");
    let out = Command::new("nix-instantiate")
        .arg("--parse")
        .arg(&flake)
        .output()
        .expect("nix-instantiate is missing: install nix-bin (scripts/setup.sh test does)");
    assert!(
        out.status.success(),
        "flake.nix does not parse:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for output in ["packages", "apps", "devShells", "checks"] {
        assert!(text.contains(output), "flake.nix has no `{output}`");
    }
}

/// A host step finds a tool that only the invoking shell's PATH has, and the shell's
/// own variables (as `nix develop` sets IN_NIX_SHELL and its inputs' paths).
#[test]
fn host_steps_run_the_invoking_shells_tools() {
    for mode in modes() {
        let sb = Sandbox::new(mode);
        let tool = sb.write(
            "devshell/bin/only-in-devshell",
            "#!/bin/sh\necho \"devshell tool says $1\"\n",
        );
        let bin = tool.parent().unwrap().to_path_buf();
        Command::new("chmod")
            .arg("755")
            .arg(&tool)
            .status()
            .unwrap();
        sb.write(
            "ci.yaml",
            &support::stage(
                "",
                r#"- step:
    type: Run
    name: use the shell
    identifier: use
    spec:
      shell: Sh
      command: |
        only-in-devshell hello
        echo "nix shell: $IN_NIX_SHELL"
"#,
            ),
        );
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        let out = sb
            .command(["run", "ci.yaml"])
            .env("PATH", path)
            .env("IN_NIX_SHELL", "impure")
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(0), "{mode:?}: {all}");
        assert!(all.contains("devshell tool says hello"), "{mode:?}: {all}");
        assert!(all.contains("nix shell: impure"), "{mode:?}: {all}");
    }
}
