"""Identity-based L4 authorization with Istio's AuthorizationPolicy semantics."""
