"""Sub-commands of the gatelab CLI, one module each; each calls ``gatelab.cli.command(...)``."""
