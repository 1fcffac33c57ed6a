"""The per-node agent: workload discovery, enrollment, in-pod redirection, proxy wiring."""
