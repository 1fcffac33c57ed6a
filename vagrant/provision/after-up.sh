#!/usr/bin/env bash
# Run on the host by the last machine's "after up/provision" trigger: install Trellis
# and run the smoke test on cp (`vagrant provision cp --provision-with trellis`).
# With parallel provisioning (libvirt) cp may still be in its own `up` when the last
# worker finishes, and Vagrant refuses a second action on a locked machine; so retry
# while it is locked, for a bounded time, and fail on any other error.
set -euo pipefail
cd "$(dirname "$0")/.."
source provision/lib.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
provision_cp() {
  if vagrant provision cp --provision-with trellis 2>&1 | tee "$log"; then
    return 0
  fi
  if grep -q "another process is already executing an action" "$log"; then
    echo "after-up: cp is still being provisioned by another vagrant process; retrying"
    return 1
  fi
  echo "after-up: installing Trellis on cp failed" >&2
  exit 1
}
WAIT_INTERVAL_S=${WAIT_INTERVAL_S:-20} wait_for "cp to finish its own provisioning" 3600 \
  provision_cp
