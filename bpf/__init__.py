"""eBPF redirection programs (C, loaded through bcc). Arrives with the eBPF mode."""
