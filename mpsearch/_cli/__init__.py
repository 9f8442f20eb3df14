"""Subcommands of the ``mpsearch`` CLI: one module each, each with ``register(subparsers)``."""
