"""The shared per-node L4 proxy: outbound capture, inbound HBONE and plaintext, pooling."""
