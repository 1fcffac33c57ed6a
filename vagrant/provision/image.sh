#!/usr/bin/env bash
# Build the Trellis image from the synced repository and load it into k3s's
# containerd, so pods use it with imagePullPolicy: Never (no registry needed).
set -euo pipefail
# An agent's containerd starts only once it has reached the server, which may
# still be coming up when VMs are provisioned in parallel (libvirt's default).
for _ in $(seq 120); do
  k3s ctr version >/dev/null 2>&1 && break
  sleep 5
done
docker build -q -f /trellis/deploy/Dockerfile -t trellis:dev /trellis
docker save trellis:dev | k3s ctr images import - >/dev/null
echo "image: trellis:dev loaded on $(hostname)"
