"""Which workload source an agent or CA process reads: the YAML file or the API server."""

from __future__ import annotations

from pathlib import Path

from nodeagent.agent import NetnsResolver
from nodeagent.source import WorkloadSource

SOURCES = ("file", "kubernetes")


async def workload_source(kind: str, *, node: str, trust_domain: str,
                          workloads_file: Path | None, kubeconfig: Path | None,
                          backoff_max_s: float = 10.0,
                          enroll_only: bool = False) -> WorkloadSource:
    """``enroll_only``: for an agent that runs no proxy, which needs only its node's
    pods and the namespaces (on Kubernetes, two narrow watches instead of six
    cluster-wide ones)."""
    if kind == "kubernetes":
        # Imported here: the file source must not need the Kubernetes client.
        from nodeagent.k8s_client import api_client, load_configuration
        from nodeagent.source_k8s import RESOURCES, KubernetesSource, agent_resources

        configuration = await load_configuration(kubeconfig)
        return KubernetesSource(lambda: api_client(configuration), node=node,
                                trust_domain=trust_domain, backoff_max_s=backoff_max_s,
                                resources=agent_resources(node) if enroll_only else RESOURCES)
    from nodeagent.source_file import FileSource

    if workloads_file is None:
        raise ValueError("--workloads: required with --source file")
    return FileSource(workloads_file, node=node, trust_domain=trust_domain)


def netns_resolver(kind: str) -> NetnsResolver | None:
    """The file names each pod's namespace; on Kubernetes it is found in /proc."""
    if kind != "kubernetes":
        return None
    from nodeagent.podnetns import ProcNetnsResolver

    return ProcNetnsResolver()
