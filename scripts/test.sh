#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine or a developer's.
#
# - Installs the system packages the tests use, when missing (needs root or sudo).
# - As root, creates the unprivileged user `sandrun-test` (with /etc/subuid and
#   /etc/subgid ranges) so that the tests also run sandrun's rootless paths for real.
# - Runs every test with cargo-nextest when present, else cargo test.
#
# Extra arguments go to the test runner (e.g. `scripts/test.sh run_host`).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  build-essential pkg-config libseccomp-dev   # building libcontainer
  uidmap iproute2                             # rootless ids, network namespaces
  docker-registry skopeo umoci busybox-static # registry + image fixtures
  apache2-utils                               # htpasswd for the auth registry
  python3 curl git slirp4netns                # services, clients, egress
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "test.sh: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ "$(id -u)" -eq 0 ]; then
  user=sandrun-test
  id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
  grep -q "^$user:" /etc/subuid || usermod --add-subuids 200000-265535 "$user"
  grep -q "^$user:" /etc/subgid || usermod --add-subgids 200000-265535 "$user"
fi

if cargo nextest --version >/dev/null 2>&1; then
  # Under CI, the `ci` profile of .config/nextest.toml (JUnit report, all failures).
  if [ "${CI:-}" = true ]; then export NEXTEST_PROFILE="${NEXTEST_PROFILE:-ci}"; fi
  cargo nextest run --no-fail-fast "$@"
else
  cargo test --no-fail-fast "$@"
fi
