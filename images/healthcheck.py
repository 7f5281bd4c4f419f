"""Container health check for the sidecar: GET an admin endpoint, exit 0 on HTTP 200, else 1.

    healthcheck.py [PATH]     PATH defaults to /livez; Kubernetes readiness uses /healthz

The admin listener is loopback-only (CONTRACT §4), which kubelet httpGet probes cannot reach, so the
image's HEALTHCHECK and the Kubernetes probes exec this script inside the sidecar. BOTBOX_ADMIN_URL
(default http://127.0.0.1:9090) follows a changed metrics_addr/metrics_port. Proxy environment
variables are ignored on purpose: the check must reach the admin listener directly. Standard library
only, so it runs with the image's Python even if the package were broken.
"""

import os
import sys
import urllib.error
import urllib.request

ALLOWED_PATHS = ("/livez", "/healthz")


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/livez"
    if path not in ALLOWED_PATHS:
        print(f"usage: healthcheck.py [{'|'.join(ALLOWED_PATHS)}]", file=sys.stderr)
        return 2
    base = os.environ.get("BOTBOX_ADMIN_URL", "http://127.0.0.1:9090").rstrip("/")
    if not base.startswith("http://"):
        print("BOTBOX_ADMIN_URL must be an http:// URL", file=sys.stderr)
        return 2
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(base + path, timeout=2) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, urllib.error.URLError) as exc:
        print(f"{path}: {exc.__class__.__name__}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"{path}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
