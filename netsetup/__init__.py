"""netsetup: programs and verifies BotBox's redirect and egress-filter rules in a pod's namespace."""

__version__ = "0.1.0"
