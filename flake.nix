{
  # sandrun as a Nix flake:
  #   nix run .# -- run .harness/ci.yaml     run a pipeline with the packaged binary
  #   nix develop                             a shell with the toolchain and what the tests use;
  #                                           host steps (no `image`) run this shell's tools
  #   nix flake check                         build the package, validate the example pipelines
  description = "Run a Harness CI stage on one Linux machine: rootless containers, no daemon";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      # Linux only: sandrun is built on Linux namespaces, overlayfs and seccomp.
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      cargoToml = builtins.fromTOML (builtins.readFile ./Cargo.toml);
    in
    {
      packages = forAll (pkgs: {
        default = pkgs.rustPlatform.buildRustPackage {
          pname = cargoToml.package.name;
          version = cargoToml.package.version;
          src = pkgs.lib.cleanSource ./.;
          # Every crate pinned by Cargo.lock (crates.io only: no git sources, no hashes to add).
          cargoLock.lockFile = ./Cargo.lock;
          nativeBuildInputs = [ pkgs.pkg-config ];
          # libcontainer's seccomp support links libseccomp.
          buildInputs = [ pkgs.libseccomp ];
          # build.rs links the binary at a fixed address (-no-pie, see its comment): the
          # wrapper's PIE hardening would undo that.
          hardeningDisable = [ "pie" ];
          # The test suite needs root or user namespaces, network namespaces and a local
          # registry: the Nix build sandbox has none of them. `checks` below runs what can.
          doCheck = false;
          meta = {
            description = cargoToml.package.description;
            license = pkgs.lib.licenses.asl20;
            platforms = pkgs.lib.platforms.linux;
            mainProgram = "sandrun";
          };
        };
      });

      apps = forAll (pkgs: {
        default = {
          type = "app";
          program = "${self.packages.${pkgs.system}.default}/bin/sandrun";
        };
      });

      devShells = forAll (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.system}.default ];
          packages = with pkgs; [
            cargo rustc clippy rustfmt cargo-nextest
            # what scripts/test.sh installs from Debian on other machines
            shadow          # newuidmap, newgidmap (NixOS: use the setuid wrappers in /run/wrappers)
            iproute2 skopeo umoci busybox docker-distribution apacheHttpd
            python3 curl git slirp4netns
          ];
        };
      });

      checks = forAll (pkgs: {
        build = self.packages.${pkgs.system}.default;
        # Validate every example pipeline with the packaged binary: no namespaces needed,
        # so it runs inside the build sandbox. Exit 2 is bad input; 1 only says that a
        # pipeline has steps that cannot run locally, which some examples have on purpose.
        validate-examples = pkgs.runCommand "sandrun-validate-examples" { } ''
          for f in ${./testdata/pipelines}/*.yaml; do
            rc=0
            ${self.packages.${pkgs.system}.default}/bin/sandrun validate "$f" || rc=$?
            [ "$rc" -ne 2 ]
          done
          touch $out
        '';
      });
    };
}
