"""BotBox: an egress sandbox sidecar for untrusted containers."""

__version__ = "0.1.0"
