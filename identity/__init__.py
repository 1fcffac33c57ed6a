"""SPIFFE identities, workload certificates and the node-scoped CA.

Bottom of the import chain: identity ← policy ← tunnel ← nodeagent. Nothing here
imports from the other Trellis packages.
"""
