"""A lab of network namespaces (nodes and pods) that runs the whole mesh on one machine."""
