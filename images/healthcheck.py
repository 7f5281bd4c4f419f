"""Container HEALTHCHECK for the sidecar: GET the admin listener's /livez, exit 0 on 200.

Runs inside the sidecar image (no third-party imports). Proxy environment variables are ignored on
purpose: the check must reach the loopback admin listener directly.
"""

import os
import sys
import urllib.error
import urllib.request

URL = os.environ.get("BOTBOX_LIVEZ_URL", "http://127.0.0.1:9090/livez")


def main() -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(URL, timeout=2) as resp:
            ok = resp.status == 200
    except (OSError, urllib.error.URLError) as exc:
        print(f"livez failed: {exc.__class__.__name__}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
