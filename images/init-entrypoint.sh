#!/bin/sh
# iptables-init container entry point.
#   no arguments: `netsetup apply` (install + read-back verify), then `netsetup verify --probe`
#                 (live proof that a non-proxy uid is redirected, IPv4 and IPv6, and UDP is blocked).
#   arguments:    passed to netsetup as is, e.g. `plan`, `verify --probe`, `remove`.
# Settings come from the BOTBOX_* environment (CONTRACT §1). Any failure exits non-zero so the pod
# (or compose's service_completed_successfully) never starts the app with an unverified namespace.
set -eu
if [ "$#" -gt 0 ]; then
    exec /opt/botbox/venv/bin/netsetup "$@"
fi
/opt/botbox/venv/bin/netsetup apply
exec /opt/botbox/venv/bin/netsetup verify --probe
