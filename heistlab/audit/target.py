"""Which target an audit may talk to, and a guard that keeps every request on it.

An audit sends attacks and abuse probes: it must never reach anything but the target it was given. A target
is ``inprocess`` (the config's own victim behind the in-process prediction API: no traffic at all), an
``https://`` URL (a heistlab server), or ``oip`` (the Open Inference Protocol server that ``api=oip`` names
by ``api.url``, http:// or https://, held to the same rules). A URL's host is resolved and every address
it resolves to must be loopback (127.0.0.0/8, ::1; ``localhost`` resolves there) unless
``audit.allow_remote=true`` is set explicitly. Every HTTP client of the audit then carries ``request_guard``,
which refuses any request whose scheme, host or port differs from the target's (a redirect is never
followed, and proxies from the environment are not used).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import NamedTuple
from urllib.parse import urlsplit

INPROCESS = "inprocess"
OIP = "oip"


class TargetRefused(ValueError):
    """The target is not one the audit may send traffic to."""


class Target(NamedTuple):
    """``kind``: ``inprocess``, ``https`` or ``oip``; ``url``, ``host`` and ``port`` set for the last two."""

    kind: str
    url: str | None = None
    host: str | None = None
    port: int | None = None


def parse_target(target: str) -> Target:
    """``inprocess`` or an ``https://host[:port]`` URL (no path, query, user or fragment)."""
    if not isinstance(target, str) or not target:
        raise ValueError(f"target must be '{INPROCESS}', '{OIP}' or an https:// URL, got {target!r}")
    if target == INPROCESS:
        return Target(INPROCESS)
    if target == OIP:
        return Target(OIP)
    parts = urlsplit(target)
    if parts.scheme != "https":
        raise ValueError(f"target must be '{INPROCESS}', '{OIP}' or an https:// URL, got {target!r}")
    if not parts.hostname or parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"target must be https://host[:port] with nothing else, got {target!r}")
    if parts.path not in ("", "/"):
        raise ValueError(f"target must be the server's root URL (https://host[:port]), got {target!r}")
    try:
        port = parts.port or 443
    except ValueError:
        raise ValueError(f"target has an invalid port: {target!r}") from None
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    return Target("https", f"https://{shown}:{port}", host, port)


def parse_oip_url(url: str) -> Target:
    """The ``oip`` target at ``api.url``: an http:// or https:// URL (a path prefix allowed, no user, query or
    fragment)."""
    parts = urlsplit(str(url))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"target=oip needs api.url to be an http:// or https:// URL, got {url!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"target=oip needs api.url without user, query or fragment, got {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"api.url has an invalid port: {url!r}") from None
    return Target(OIP, str(url).rstrip("/"), parts.hostname, port)


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the system resolver)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def check_target(
    target: str,
    allow_remote: bool = False,
    resolver: Callable[[str, int], list[str]] = resolve,
    oip_url: str | None = None,
) -> Target:
    """The parsed target; ``TargetRefused`` when its host resolves outside loopback and remote is not allowed.

    oip_url: ``api.url`` when ``api=oip`` (the address of ``target=oip``).

    A host that does not resolve is refused too (an audit must know where its traffic goes).
    """
    if not isinstance(allow_remote, bool):
        raise ValueError(f"audit.allow_remote must be true or false, got {allow_remote!r}")
    parsed = parse_target(target)
    if parsed.kind == OIP:
        if oip_url is None:
            raise ValueError(
                "target=oip audits the server api=oip names: set api=oip api.url=... api.model=..."
            )
        parsed = parse_oip_url(oip_url)
    if parsed.kind == INPROCESS or allow_remote:
        return parsed
    try:
        addresses = resolver(parsed.host, parsed.port)
    except OSError as error:
        raise TargetRefused(f"target host {parsed.host!r} does not resolve ({error})") from None
    outside = [address for address in addresses if not is_loopback(address)]
    if not addresses or outside:
        raise TargetRefused(
            f"target {parsed.url} resolves to {', '.join(addresses) or 'nothing'}, not only loopback "
            "(127.0.0.0/8, ::1, localhost): an audit sends attack traffic, so it refuses other hosts unless "
            "audit.allow_remote=true is set explicitly"
        )
    return parsed


class TargetViolation(RuntimeError):
    """A request of the audit was about to leave the target."""


def request_guard(target: Target) -> Callable:
    """An httpx request hook refusing every request not addressed to ``target``'s scheme, host and port."""
    if target.kind not in ("https", OIP):
        raise ValueError(f"request_guard needs an https or oip target, got {target.kind!r}")
    scheme = urlsplit(target.url).scheme
    default_port = 443 if scheme == "https" else 80

    def guard(request) -> None:
        url = request.url
        if (url.scheme, url.host, url.port or default_port) != (scheme, target.host, target.port):
            raise TargetViolation(f"refusing to send a request to {url}: the audit's target is {target.url}")

    return guard
