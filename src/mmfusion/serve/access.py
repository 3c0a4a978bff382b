"""Who may reach `mmfusion serve`: the API key (flag or environment) and the rule for non-loopback binds.

A server bound to an address other than loopback (0.0.0.0, ::, a LAN address, a host name) is reachable from
other machines, so it refuses to start without an API key unless the operator says `--insecure`.
"""

from __future__ import annotations

import ipaddress
import os

API_KEY_ENV = "MMFUSION_API_KEY"


def api_key(flag: str | None) -> str | None:
    """The key to require: `--api-key` if given, else $MMFUSION_API_KEY; None when neither is set (or empty).

    The environment variable keeps the key off the command line, where `ps` and `docker inspect` show it."""
    key = flag if flag is not None else os.environ.get(API_KEY_ENV)
    return key or None


def is_loopback(host: str) -> bool:
    """True for "localhost" and loopback IP literals (127.0.0.0/8, ::1); False for anything else, host names
    included (they may resolve to a reachable address)."""
    if host.lower() == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def exposure_problem(host: str, key: str | None, insecure: bool) -> str | None:
    """None when the server may bind `host`, else the one-line reason it may not."""
    if is_loopback(host) or key or insecure:
        return None
    return (
        f"--host {host} is reachable from other machines, and no API key is set: set ${API_KEY_ENV} "
        "(or --api-key KEY), or pass --insecure to serve without one"
    )


__all__ = ["API_KEY_ENV", "api_key", "exposure_problem", "is_loopback"]
