#!/usr/bin/env bash
# Installs the Debian packages sandrun needs, when missing (as root, or through sudo).
#
#   scripts/setup.sh         what building and running need: a C toolchain, pkg-config and
#                            libseccomp-dev (libcontainer links libseccomp), uidmap
#                            (newuidmap/newgidmap, for images that use more than one user)
#   scripts/setup.sh test    also what the test suite uses: a local registry, skopeo,
#                            umoci, busybox, htpasswd, python3, curl, git, slirp4netns
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
