#!/usr/bin/env bash
# k3s with its default CNI (flannel) on the private network. The server also
# serves the API on SERVER_IP; agents join it with the shared lab token.
set -euo pipefail
: "${K3S_ROLE:?}" "${NODE_IP:?}" "${SERVER_IP:?}" "${K3S_VERSION:?}" "${K3S_TOKEN:?}"
iface=$(ip -o -4 addr show | awk -v ip="$NODE_IP" '$4 ~ "^"ip"/" {print $2; exit}')
if [ -z "$iface" ]; then
  echo "k3s: no interface carries $NODE_IP" >&2
  exit 1
fi
if systemctl is-active --quiet k3s k3s-agent 2>/dev/null; then
  echo "k3s: already running on $(hostname)"
  exit 0
fi
common=(--node-ip "$NODE_IP" --flannel-iface "$iface")
export INSTALL_K3S_VERSION="$K3S_VERSION" K3S_TOKEN
if [ "$K3S_ROLE" = server ]; then
  curl -sfL https://get.k3s.io | sh -s - server "${common[@]}" \
    --advertise-address "$SERVER_IP" --tls-san "$SERVER_IP" \
    --write-kubeconfig-mode 0644 --disable traefik --disable servicelb
else
  export K3S_URL="https://${SERVER_IP}:6443"
  curl -sfL https://get.k3s.io | sh -s - agent "${common[@]}"
fi
echo "k3s: $K3S_ROLE up on $(hostname) ($NODE_IP via $iface)"
