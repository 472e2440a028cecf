"""Outbound HTTP of the push worker: where it may connect, and how.

A Web Push endpoint is a URL a user typed (or a browser handed out): without care, the worker is
an SSRF gadget that POSTs to the cloud metadata service or to anything on the internal network.
So every URL goes through `check_url` (at registration and again before each attempt), which
resolves the host once and checks *every* address; `post` then connects to one of exactly those
addresses (pinned: a DNS answer that changes between the check and the connection, "DNS
rebinding", changes nothing), while TLS still gets the original name for SNI and certificate
verification and the request its Host header. `post` never follows a redirect, never reads the
response body, and holds an attempt to one deadline in total, however slowly a server answers.

The webhook URL is configured by the operator, so it may be internal or plain http
(`webhook_policy`); it gets the same pinned, deadline-bound, redirect-free request.
"""
from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the addresses it resolves to, as strings. Tests inject one (see `resolve`).
Resolver = Callable[[str, int], Sequence[str]]

DEFAULT_PORTS = {"https": 443, "http": 80}
MAX_URL_LENGTH = 1024
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_NUMERIC = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


class UnsafeDestination(Exception):
    """The URL may not be connected to. The message is safe to show to the user who supplied it:
    it says which rule, never what the name resolved to."""


class Unresolvable(Exception):
    """The host did not resolve (in time)."""


@dataclass(frozen=True)
class Policy:
    """What a URL must be for the worker to connect to it."""

    schemes: tuple[str, ...] = ("https",)
    # None: any port.
    ports: tuple[int, ...] | None = (443,)
    # Only public (globally routable unicast) addresses.
    public_only: bool = True
    # Development escape (CHAT_WEBPUSH_ALLOW_HTTP): loopback addresses pass too. Never private
    # networks, link-local (metadata services) or the rest.
    allow_loopback: bool = False
    # Host suffixes (`fcm.googleapis.com`, `*.notify.windows.com`); empty: any host.
    allowed_hosts: tuple[str, ...] = ()


WEBHOOK_POLICY = Policy(schemes=("https", "http"), ports=None, public_only=False)


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (`addresses`, all of them checked) and what to ask for."""

    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[str, ...]

    @property
    def origin(self) -> str:
        default = DEFAULT_PORTS[self.scheme] == self.port
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}" + ("" if default else f":{self.port}")


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# The resolver `check_url` uses unless given one; tests replace it (monkeypatch) so that no test
# ever asks a real DNS server or reaches a non-loopback address.
resolve: Resolver = system_resolver
# getaddrinfo cannot be interrupted: it runs here so an attempt can stop waiting at its deadline.
_dns_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="push-dns")


def is_public(address: IPAddress) -> bool:
    """Globally routable unicast: not private, loopback, link-local, multicast, reserved,
    unspecified, carrier-grade NAT or documentation, also when embedded in IPv6."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(embedded)
        if address.teredo or address.is_site_local:
            return False
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return False
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def _loopback(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def host_allowed(host: str, allowed_hosts: Sequence[str]) -> bool:
    """`fcm.googleapis.com` allows that host and its subdomains; `*.x.com` only subdomains."""
    if not allowed_hosts:
        return True
    for pattern in allowed_hosts:
        pattern = pattern.strip().lower().rstrip(".")
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):
                return True
        elif host == pattern or host.endswith("." + pattern):
            return True
    return False


def _parse_host(hostname: str) -> IPAddress | str:
    """An IP literal, or a DNS name in canonical ASCII form; UnsafeDestination otherwise."""
    if "%" in hostname:  # an IPv6 zone id names a local interface
        raise UnsafeDestination("The host must be a DNS name or an IP address.")
    try:
        return ipaddress.ip_address(hostname)
    except ValueError:
        pass
    name = hostname.rstrip(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise UnsafeDestination("The host must be a DNS name (ASCII, punycode for others) or an IP address.")
    # 2130706433, 0x7f000001, 0177.0.0.1, 127.1: numeric forms that resolvers read as IPv4
    # addresses. No real DNS name has an all-numeric last label.
    if _NUMERIC.match(labels[-1]):
        raise UnsafeDestination("The host must be a DNS name or a plain IP address, not a numeric alias.")
    return name


def check_url(
    url: str, *, policy: Policy, resolver: Resolver | None = None, timeout: float = 5.0
) -> Target:
    """The Target for `url` if the worker may connect to it under `policy`; raises
    UnsafeDestination (a rule is broken) or Unresolvable (DNS failed or timed out)."""
    if len(url) > MAX_URL_LENGTH or any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise UnsafeDestination("Not a valid URL.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UnsafeDestination("Not a valid URL.") from None
    if parts.scheme not in policy.schemes or not parts.netloc:
        raise UnsafeDestination(f"Must be an absolute {' or '.join(policy.schemes)} URL.")
    if "@" in parts.netloc:
        raise UnsafeDestination("Must not carry a user name or password.")
    if not parts.hostname:
        raise UnsafeDestination("Must name a host.")
    port = port if port is not None else DEFAULT_PORTS[parts.scheme]
    if policy.ports is not None and port not in policy.ports:
        raise UnsafeDestination(f"Must use port {' or '.join(map(str, policy.ports))}.")
    host = _parse_host(parts.hostname)
    if policy.allowed_hosts and (not isinstance(host, str) or not host_allowed(host, policy.allowed_hosts)):
        raise UnsafeDestination("This push service is not allowed on this server.")
    if isinstance(host, str):
        future = _dns_pool.submit(resolver or resolve, host, port)
        try:
            addresses = list(future.result(timeout=timeout))
        except FutureTimeout:
            raise Unresolvable("DNS lookup timed out") from None
        except (OSError, UnicodeError) as exc:
            raise Unresolvable(f"DNS lookup failed ({type(exc).__name__})") from None
        if not addresses:
            raise Unresolvable("DNS lookup returned no address")
        host_text = host
    else:
        addresses = [str(host)]
        host_text = str(host)
    for text in addresses:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            raise UnsafeDestination("The host does not resolve to an IP address.") from None
        if policy.public_only and not is_public(address) and not (policy.allow_loopback and _loopback(address)):
            raise UnsafeDestination("Must be a public address (not private, loopback, link-local or reserved).")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(parts.scheme, host_text, port, path, tuple(addresses))


@lru_cache(maxsize=1)
def _default_ssl_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    try:
        import certifi

        context.load_verify_locations(certifi.where())
    except (ImportError, OSError):
        pass
    return context


# Replaced by tests that run a TLS receiver with their own certificate authority.
ssl_context: Callable[[], ssl.SSLContext] = _default_ssl_context


class DeadlineExceeded(Exception):
    pass


# What `post` raises when the request failed (as opposed to a bug here).
REQUEST_ERRORS = (OSError, http.client.HTTPException, DeadlineExceeded)


class _Pinned:
    """http.client connections that connect to a checked address instead of resolving again;
    TLS still verifies the certificate for (and sends SNI of) the URL's host."""

    @staticmethod
    def connection(target: Target, address: str, timeout: float) -> http.client.HTTPConnection:
        if target.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                target.host, target.port, timeout=timeout, context=ssl_context()
            )
        else:
            conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)

        def pinned(_address: tuple[str, int], timeout: float | None = None, source_address=None) -> socket.socket:
            return socket.create_connection((address, target.port), timeout, source_address)

        conn._create_connection = pinned  # type: ignore[attr-defined]
        return conn


def post(target: Target, *, body: bytes, headers: dict[str, str], deadline: float) -> int:
    """POST `body` to `target` and return the response's status code; the body of the response
    is never read. Finishes by `deadline` (time.monotonic()) whatever the server does: a watchdog
    shuts the socket down when it passes. Raises DeadlineExceeded or OSError/HTTPException-derived
    errors, whose messages carry nothing the server sent."""
    last_error: Exception | None = None
    for address in target.addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded()
        conn = _Pinned.connection(target, address, remaining)
        expired = threading.Event()

        def cut(conn: http.client.HTTPConnection = conn, expired: threading.Event = expired) -> None:
            expired.set()
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(remaining, cut)
        watchdog.daemon = True
        watchdog.start()
        try:
            try:
                conn.connect()
            except OSError as exc:
                if expired.is_set() or time.monotonic() >= deadline:
                    raise DeadlineExceeded() from None
                last_error = exc
                continue  # the next checked address, if any
            conn.request("POST", target.path, body=body, headers={**headers, "Connection": "close"})
            response = conn.getresponse()
            return response.status
        except (OSError, http.client.HTTPException, ValueError):
            if expired.is_set() or time.monotonic() >= deadline:
                raise DeadlineExceeded() from None
            raise
        finally:
            watchdog.cancel()
            conn.close()
    assert last_error is not None
    raise last_error


def describe(exc: BaseException) -> str:
    """A failed request in words fit for last_error and logs: never the server's bytes (an
    http.client error can quote the status line or headers it choked on)."""
    if isinstance(exc, DeadlineExceeded):
        return "deadline exceeded"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not valid: {exc.verify_message}"
    if isinstance(exc, http.client.HTTPException):
        return f"malformed response ({type(exc).__name__})"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__
