#!/usr/bin/env bash
# On the control plane, once every node is up: the CA root, the chart (through
# k3s's built-in Helm controller, so no helm binary is needed here), the demo
# app, enrollment of its namespace, then the smoke test.
set -euo pipefail
# Vagrant uploads each script alone (to /tmp); lib.sh is in the synced repository.
source "${TRELLIS_LIB:-/trellis/vagrant/provision/lib.sh}"
kubectl() { k3s kubectl "$@"; }
ns=trellis-system
trust_domain=cluster.local
nodes=3

ready_nodes() {
  [ "$(kubectl get nodes --no-headers 2>/dev/null | awk '$2 == "Ready"' | wc -l)" -ge "$nodes" ]
}
# Every node's kubelet lists the images its containerd holds (provision/image.sh
# imports them from the server's tarball).
images_everywhere() {
  local with
  with=$(kubectl get nodes -o jsonpath='{range .items[*]}{.status.images[*].names}{"\n"}{end}' \
    | grep -c 'trellis:dev' || true)
  [ "$with" -ge "$nodes" ]
}
echo "trellis: waiting for $nodes Ready nodes"
wait_for "$nodes Ready nodes" 1800 ready_nodes
kubectl get nodes
echo "trellis: waiting for the images on every node"
wait_for "trellis:dev on $nodes nodes" 1800 images_everywhere

kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f -
if ! kubectl -n "$ns" get secret trellis-ca-root >/dev/null 2>&1; then
  echo "trellis: creating the CA root"
  root=$(mktemp -d)
  # As root in the container: the image's default user cannot write to $root.
  docker run --rm --user 0:0 -v "$root:/out" --entrypoint python3 trellis:dev -c \
    "from pathlib import Path; from identity.ca import CertificateAuthority; \
CertificateAuthority.load_or_create(Path('/out'), '$trust_domain')"
  kubectl -n "$ns" create secret generic trellis-ca-root \
    --from-file="$root/root-cert.pem" --from-file="$root/root-key.pem"
  kubectl -n "$ns" create configmap trellis-ca-root-cert --from-file="$root/root-cert.pem" \
    --dry-run=client -o yaml | kubectl apply -f -
  rm -rf "$root"
fi

# k3s keeps its CNI files in its own tree; take the bin dir containerd really uses.
cni_bin=$(sed -n 's/^ *bin_dir *= *"\(.*\)"/\1/p' \
  /var/lib/rancher/k3s/agent/etc/containerd/config.toml | head -1)
cni_bin=${cni_bin:-/var/lib/rancher/k3s/data/cni}
chart=$(tar czf - -C /trellis/deploy/charts trellis | base64 -w0)
cat > /var/lib/rancher/k3s/server/manifests/trellis.yaml <<YAML
apiVersion: helm.cattle.io/v1
kind: HelmChart
metadata:
  name: trellis
  namespace: kube-system
spec:
  targetNamespace: $ns
  chartContent: $chart
  valuesContent: |
    image: {repository: trellis, tag: dev, pullPolicy: Never}
    trustDomain: $trust_domain
    cni:
      binDir: $cni_bin
      confDir: /var/lib/rancher/k3s/agent/etc/cni/net.d
YAML
chart_applied() { kubectl -n "$ns" get ds/trellis-agent ds/trellis-proxy >/dev/null 2>&1; }
echo "trellis: waiting for the chart"
wait_for "k3s's Helm controller to install the chart" 600 chart_applied
kubectl -n "$ns" rollout status deploy/trellis-ca --timeout=300s
kubectl -n "$ns" rollout status ds/trellis-proxy --timeout=300s
kubectl -n "$ns" rollout status ds/trellis-agent --timeout=300s

kubectl apply -f /trellis/vagrant/demo.yaml
kubectl label namespace demo trellis.dev/dataplane-mode=ambient --overwrite
# Pods created before the label are enrolled by the agent when it sees the label;
# restart them anyway so this run also exercises the CNI path for new pods.
kubectl -n demo rollout restart deploy/frontend deploy/backend
kubectl -n demo rollout status deploy/frontend --timeout=300s
kubectl -n demo rollout status deploy/backend --timeout=300s

python3 /trellis/vagrant/smoke.py --driver kubectl --kubectl "k3s kubectl" \
  --trust-domain "$trust_domain"
