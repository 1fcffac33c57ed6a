#!/usr/bin/env bash
# Every VM: the tools the other steps use. Docker only on the server, the one VM that
# builds the images (provision/image.sh); k3s runs pods with its own containerd.
set -euo pipefail
: "${K3S_ROLE:?}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
packages=(curl ca-certificates python3 iptables rsync)
if [ "$K3S_ROLE" = server ]; then packages+=(docker.io); fi
apt-get install -y -qq "${packages[@]}" >/dev/null
# Pod traffic crosses the private network through flannel's VXLAN.
modprobe br_netfilter || true
sysctl -qw net.ipv4.ip_forward=1
echo "base: done on $(hostname)"
