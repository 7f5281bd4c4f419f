"""HTTPS interception: CA loading, leaf issuance, certificate cache, SNI handshake, listener glue.

``install_interception(server, app)`` is the hook :class:`botbox.server.Runtime` calls when
``https_interception.enabled`` is true: it loads the CA (fail closed, SECURITY-SPEC T1), marks the app
CA-ready for ``/healthz`` and registers the ``https_interception`` listener (loopback only, L2, with the
``[::1]`` twin, sharing ``max_connections``, the gauge and the drain with the HTTP listener).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from botbox.tls.ca import CAError, CertificateAuthority, load_ca

if TYPE_CHECKING:
    from botbox.pipeline import ProxyApp
    from botbox.server import Server
    from botbox.tls.listener import Interceptor

__all__ = ["CAError", "CertificateAuthority", "install_interception", "load_ca"]


def install_interception(server: Server, app: ProxyApp) -> Interceptor:
    """Load the CA and register the interception listener.  Raises ``StartupError`` (exit 1)."""
    from botbox.server import StartupError
    from botbox.tls.listener import Interceptor

    settings = app.config.https_interception
    if settings is None or not settings.enabled:
        raise StartupError("https_interception is not enabled")
    try:
        interceptor = Interceptor.from_app(app)
    except CAError as exc:
        raise StartupError(str(exc)) from None
    server.add_listener("https_interception", settings.listen_addr, settings.listen_port, interceptor.handle)
    app.logger.info(
        "https interception enabled", ca_subject=interceptor.ca.cert.subject.rfc4514_string(),
        ca_not_after=interceptor.ca.not_after.isoformat(), listen_port=settings.listen_port,
        deny_handshake_on_disallowed_sni=settings.deny_handshake_on_disallowed_sni,
    )
    return interceptor
