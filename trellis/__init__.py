"""The `trellis` command: one entry point that gathers each package's subcommands."""
