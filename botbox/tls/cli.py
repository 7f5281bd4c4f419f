"""``botbox ca init`` (create an interception CA) and ``botbox ca check`` (validate the configured one).

Wired into :mod:`botbox.cli` through ``add_parser(subparsers)``.  Exit codes: ``init``: 0 written, 1
refused or failed (existing files are never overwritten); ``check``: 0 usable, 1 unusable (same checks
and messages as ``botbox run``), 2 invalid configuration; both: 2 bad arguments (argparse).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from botbox.tls.ca import CAError, generate_ca, write_ca

__all__ = ["DEFAULT_CA_NAME", "DEFAULT_DAYS", "add_parser", "cmd_ca_check", "cmd_ca_init"]

DEFAULT_CA_NAME = "BotBox Interception CA"
DEFAULT_DAYS = 365
MAX_DAYS = 3650

_NEXT_STEPS = """\
Next steps (see README, "HTTPS interception"):

  1. The pair is for the botbox sidecar ONLY (the key must never reach the app container):
       kubectl create secret tls botbox-ca --cert={crt} --key={key}
     mount it read-only at /etc/botbox/ca in the botbox container with defaultMode 0400
     (do not set a pod fsGroup: it adds group-read to secret files and botbox refuses a key with
     mode & 0o077), and set https_interception.enabled: true in the botbox config.

  2. The app container gets the PUBLIC certificate only:
       kubectl create configmap botbox-ca-public --from-file=botbox-ca.crt={crt}
     mount it at /etc/botbox-ca and point the app's TLS stack at it:
       SSL_CERT_FILE=/etc/botbox-ca/botbox-ca.crt        # OpenSSL, Python ssl, httpx, openai SDK
       REQUESTS_CA_BUNDLE=/etc/botbox-ca/botbox-ca.crt   # Python requests
       NODE_EXTRA_CA_CERTS=/etc/botbox-ca/botbox-ca.crt  # Node.js
       CURL_CA_BUNDLE=/etc/botbox-ca/botbox-ca.crt       # curl (ignores SSL_CERT_FILE on Debian)
     or, in Debian/Ubuntu based images, add it to the system store at build/start time:
       cp /etc/botbox-ca/botbox-ca.crt /usr/local/share/ca-certificates/botbox-ca.crt
       update-ca-certificates
"""


def _days(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= MAX_DAYS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_DAYS}")
    return value


def _name(text: str) -> str:
    if not 1 <= len(text) <= 64 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise argparse.ArgumentTypeError("must be 1..64 printable characters")
    return text


def add_parser(subparsers: Any) -> None:
    """Register ``ca init`` on the top-level ``botbox`` sub-command parser."""
    ca = subparsers.add_parser("ca", help="manage the HTTPS interception CA")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="CA_COMMAND")
    init = ca_sub.add_parser(
        "init", help="create a CA pair: DIR/tls.crt (0644) and DIR/tls.key (0400); never overwrites"
    )
    init.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    init.add_argument("--days", type=_days, default=DEFAULT_DAYS,
                      help=f"validity in days, 1..{MAX_DAYS} (default {DEFAULT_DAYS})")
    init.add_argument("--name", type=_name, default=DEFAULT_CA_NAME,
                      help=f"CA common name (default {DEFAULT_CA_NAME!r})")
    init.set_defaults(handler=cmd_ca_init)
    check = ca_sub.add_parser(
        "check", help="load the CA named by a config exactly as `botbox run` would; exit 0 ok, 1 unusable"
    )
    check.add_argument("-c", "--config", default="/etc/botbox/config.yaml", help="config file")
    check.set_defaults(handler=cmd_ca_check)


def cmd_ca_init(args: argparse.Namespace) -> int:
    try:
        cert, key = generate_ca(args.name, args.days)
        crt_path, key_path = write_ca(args.out, cert, key)
    except CAError as exc:
        print(f"botbox ca init: {exc}", file=sys.stderr)
        return 1
    fp = cert.fingerprint(_sha256()).hex(":")
    print(f"wrote {crt_path} (public certificate, mode 0644)")
    print(f"wrote {key_path} (private key, mode 0400)")
    print(f"CA {cert.subject.rfc4514_string()}, valid until {cert.not_valid_after_utc.isoformat()}, "
          f"SHA-256 fingerprint {fp}")
    print()
    print(_NEXT_STEPS.format(crt=crt_path, key=key_path), end="")
    return 0


def cmd_ca_check(args: argparse.Namespace) -> int:
    from botbox.config import ConfigError, load_config
    from botbox.tls.ca import load_ca
    from botbox.tls.issuer import LeafIssuer

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"botbox ca check: invalid configuration {args.config}:", file=sys.stderr)
        for line in exc.errors or [str(exc)]:
            print(f"  {line}", file=sys.stderr)
        return 2
    hi = cfg.https_interception
    if hi is None or not hi.enabled:
        print("https_interception is not enabled in this configuration; nothing to check")
        return 0
    try:
        ca = load_ca(hi.ca_cert_path, hi.ca_key_path)
        LeafIssuer(ca, hi.cert_ttl_seconds).issue("botbox-selftest.invalid")
    except CAError as exc:
        print(f"botbox ca check: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"botbox ca check: CA {hi.ca_cert_path}: cannot issue a test certificate "
              f"({type(exc).__name__})", file=sys.stderr)
        return 1
    cert = ca.cert
    fp = cert.fingerprint(_sha256()).hex(":")
    print(f"CA {cert.subject.rfc4514_string()} ({hi.ca_cert_path}, key {hi.ca_key_path}) is usable")
    print(f"valid {cert.not_valid_before_utc.isoformat()} .. {cert.not_valid_after_utc.isoformat()}, "
          f"SHA-256 fingerprint {fp}")
    return 0


def _sha256() -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()
