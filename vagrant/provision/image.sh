#!/usr/bin/env bash
# The images, built once for the whole cluster and imported into every node's k3s
# containerd from one tarball (pods use them with imagePullPolicy: Never, so no
# registry is needed):
# - on the server (K3S_ROLE=server): build trellis:dev and trellis-demo:dev with
#   Docker, save both into one tarball with its sha256, import it, and serve the
#   directory on the private network (SERVER_IP:IMAGE_PORT) for the agents;
# - on an agent: wait for the server's tarball, check its sha256, import it.
# Runs in parallel with the other VMs' provisioning (libvirt) or after them
# (VirtualBox): every wait is bounded and fails the step when it runs out.
set -euo pipefail
# Vagrant uploads each script alone (to /tmp); lib.sh is in the synced repository.
source "${TRELLIS_LIB:-/trellis/vagrant/provision/lib.sh}"
: "${K3S_ROLE:?}" "${SERVER_IP:?}"
src=${TRELLIS_SRC:-/trellis}
dir=${TRELLIS_IMAGE_DIR:-/var/lib/trellis/images}
port=${IMAGE_PORT:-8088}
tarball=trellis-images.tar
mkdir -p "$dir"

# An agent's containerd starts only once it has reached the server.
containerd_up() { k3s ctr version >/dev/null 2>&1; }
wait_for "k3s containerd on $(hostname)" 900 containerd_up

if [ "$K3S_ROLE" = server ]; then
  docker build -q -f "$src/deploy/Dockerfile" -t trellis:dev "$src"
  docker build -q -f "$src/deploy/Dockerfile" --target demo -t trellis-demo:dev "$src"
  docker save -o "$dir/$tarball.part" trellis:dev trellis-demo:dev
  (cd "$dir" && sha256sum "$tarball.part" | sed "s/\.part\$//" > "$tarball.sha256.part")
  mv "$dir/$tarball.part" "$dir/$tarball"
  mv "$dir/$tarball.sha256.part" "$dir/$tarball.sha256"
  # Serve it to the agents (a lab network: the sha256 is checked, nothing else).
  systemctl stop trellis-images 2>/dev/null || true
  systemd-run --unit trellis-images --property=Restart=on-failure \
    python3 -m http.server "$port" --bind "$SERVER_IP" --directory "$dir"
else
  fetch() {
    curl -sfo "$dir/$tarball.sha256" "http://$SERVER_IP:$port/$tarball.sha256"
  }
  # The server builds first: minutes, more on a slow link.
  wait_for "the images from http://$SERVER_IP:$port" 2700 fetch
  curl -sfo "$dir/$tarball" "http://$SERVER_IP:$port/$tarball"
  (cd "$dir" && sha256sum -c --quiet "$tarball.sha256")
fi
k3s ctr images import "$dir/$tarball" >/dev/null
echo "image: trellis:dev and trellis-demo:dev imported on $(hostname) from $dir/$tarball"
