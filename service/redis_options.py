"""Connection options every Redis client of the service shares: TLS files, and a redacted URL.

``NP_REDIS_URL`` may be ``redis://`` (plain TCP) or ``rediss://`` (TLS), with a password
(``rediss://:password@host:6380/0``) or a user and password (``rediss://user:password@...``).
redis-py reads TLS options from the URL's query string too (``?ssl_ca_certs=/path/ca.pem``);
the ``NP_REDIS_SSL_*`` settings are the same options as files, so that a mounted secret can be
named without editing the URL. They apply to ``rediss://`` URLs only (the settings refuse them
with a plain ``redis://`` URL).

The password must never reach a log line: log :func:`redact_url` of the URL, never the URL.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .settings import Settings

__all__ = ["tls_options", "redact_url"]


def tls_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``Redis.from_url`` (sync or asyncio) from the ``NP_REDIS_SSL_*``
    settings; empty unless the URL is ``rediss://`` and a setting is given."""
    url = settings.redis_url or ""
    if not url.startswith("rediss://"):
        return {}
    opts: dict[str, Any] = {}
    if settings.redis_ssl_ca_certs is not None:
        opts["ssl_ca_certs"] = str(settings.redis_ssl_ca_certs)
    if settings.redis_ssl_certfile is not None:
        opts["ssl_certfile"] = str(settings.redis_ssl_certfile)
    if settings.redis_ssl_keyfile is not None:
        opts["ssl_keyfile"] = str(settings.redis_ssl_keyfile)
    if not settings.redis_ssl_check_hostname:
        opts["ssl_check_hostname"] = False
    return opts


def redact_url(url: str | None) -> str:
    """``url`` with its password (if any) replaced by ``***``: safe to log.

    >>> redact_url("rediss://:s3cret@redis.example:6380/0?ssl_ca_certs=/etc/ca.pem")
    'rediss://:***@redis.example:6380/0?ssl_ca_certs=/etc/ca.pem'
    >>> redact_url("redis://app:s3cret@10.0.0.5:6379/1")
    'redis://app:***@10.0.0.5:6379/1'
    >>> redact_url("redis://127.0.0.1:6379/0")
    'redis://127.0.0.1:6379/0'
    """
    if not url:
        return str(url)
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    except ValueError:  # unparseable (a bad port...): show the scheme only
        return url.split("://", 1)[0] + "://<redacted>"
