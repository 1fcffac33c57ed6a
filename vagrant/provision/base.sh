#!/usr/bin/env bash
# Every VM: the tools the other steps use. Docker only builds the Trellis image;
# k3s runs pods with its own containerd.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq curl ca-certificates python3 iptables rsync docker.io >/dev/null
# Pod traffic crosses the private network through flannel's VXLAN.
modprobe br_netfilter || true
sysctl -qw net.ipv4.ip_forward=1
echo "base: done on $(hostname)"
