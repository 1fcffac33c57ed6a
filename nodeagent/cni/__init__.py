"""The chained CNI plugin ``trellis-cni`` and its wire protocol to the node agent.

Everything here uses only the standard library and starts in milliseconds: the
container runtime execs the plugin once per pod sandbox, on the host, where
neither our virtualenv nor its dependencies exist (deploy/ installs it as a
zipapp run by the host's python3).
"""
