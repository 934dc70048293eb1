"""Subcommands of ``egm-assist``; each module exposes ``register(subparsers)``."""
