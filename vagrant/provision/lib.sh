#!/usr/bin/env bash
# Shared by the provisioning scripts (sourced, on the VMs and on the host).

# wait_for DESCRIPTION TIMEOUT_S COMMAND...: run COMMAND every 5 s (WAIT_INTERVAL_S)
# until it succeeds; after TIMEOUT_S seconds, fail the whole script, saying what
# never happened, instead of carrying on as if it had.
wait_for() {
  local what=$1 timeout=$2 interval=${WAIT_INTERVAL_S:-5}
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@"; do
    if ((SECONDS >= deadline)); then
      echo "timed out after ${timeout}s waiting for: $what" >&2
      exit 1
    fi
    sleep "$interval"
  done
}
