#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine or a developer's.
#
# - Installs the system packages the tests use, when missing (scripts/setup.sh test;
#   needs root or sudo). As root it also creates the unprivileged user `sandrun-test`
#   so that the tests also run sandrun's rootless paths for real.
# - Runs every test with cargo-nextest when present, else cargo test.
#
# Extra arguments go to the test runner (e.g. `scripts/test.sh run_host`).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh test

if cargo nextest --version >/dev/null 2>&1; then
  # Under CI, the `ci` profile of .config/nextest.toml (JUnit report, all failures).
  if [ "${CI:-}" = true ]; then export NEXTEST_PROFILE="${NEXTEST_PROFILE:-ci}"; fi
  cargo nextest run --no-fail-fast "$@"
else
  cargo test --no-fail-fast "$@"
fi
