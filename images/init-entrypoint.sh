#!/bin/sh
# iptables-init container entry point.
#   no arguments: `netsetup apply --probe`: install the rules, read them back and compare with the plan,
#                 then prove the live path (a non-proxy uid is redirected to the proxy port, IPv4 and
#                 IPv6; direct UDP fails). Needs NET_ADMIN, NET_RAW, and SETUID/SETGID for the probe.
#   arguments:    passed to netsetup as is, e.g. `plan`, `verify --probe`, `remove`.
# Settings come from the BOTBOX_* environment (CONTRACT §1). Any failure exits non-zero, so the pod
# (or compose's service_completed_successfully) never starts the app in an unverified namespace.
set -eu
if [ "$#" -gt 0 ]; then
    exec /opt/botbox/venv/bin/netsetup "$@"
fi
exec /opt/botbox/venv/bin/netsetup apply --probe
