"""SSRF guard for image URLs that workers fetch.

Task data comes from Label Studio users, so an image URL may point anywhere: the
cloud metadata service, Redis on loopback, an intranet admin page. A URL passes
only when

* its scheme is http or https,
* its host is Label Studio's origin (host and port, always allowed: ``/data/upload``
  lives there, often on loopback) or matches ``EGM_ALLOWED_HOSTS``
  (``host``, ``host:port``, ``*.domain`` or ``*`` for any public host), and
* every address the host resolves to is public, unless
  ``EGM_ALLOW_PRIVATE_NETWORKS`` is on. Cloud metadata, unspecified, multicast and
  reserved addresses are refused even then: they are never image servers.

Numeric hosts in the legacy ``inet_aton`` spellings (``2130706433``, ``0x7f.1``,
``0177.0.0.1``) are refused outright: they only exist to dodge filters.

DNS rebinding: :meth:`UrlGuard.vet` resolves once and returns the vetted addresses;
:meth:`VettedUrl.pinned` builds a request for one of those exact addresses (Host
header and TLS SNI keep the original name), so the connection cannot go to an
address that was not checked. Callers follow redirects themselves and vet every hop.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

from egm.redaction import redact_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: host, port -> addresses as strings (default: socket.getaddrinfo). A seam for tests.
Resolver = Callable[[str, int], list[str]]

ALLOWED_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}

#: Cloud instance-metadata endpoints (AWS/GCP/Azure/OpenStack, AWS ECS, Alibaba, AWS IPv6).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
#: Categories refused even with allow_private_networks.
ALWAYS_REFUSED = frozenset({"cloud metadata", "unspecified", "multicast", "reserved"})

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)


class BlockedUrlError(ValueError):
    """The URL may not be fetched. The message never contains credentials."""


class UrlResolveError(BlockedUrlError):
    """The host could not be resolved (a fetch failure rather than a policy refusal)."""


# --- addresses ----------------------------------------------------------------

def _embedded_ipv4(addr: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """An IPv4 address that traffic to this IPv6 address really reaches, and how it is embedded."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped, "IPv4-mapped"
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF), "NAT64"
    if addr.sixtofour is not None:
        return addr.sixtofour, "6to4"
    if addr.teredo is not None:
        return addr.teredo[1], "Teredo"
    return None


def address_category(addr: IPAddress) -> str | None:
    """Why ``addr`` is not a public unicast address (``None`` when it is)."""
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(addr)
        if embedded is not None:
            inner, how = embedded
            category = address_category(inner)
            if category is not None:
                return category
            if how in ("IPv4-mapped", "NAT64"):  # these IPv6 ranges are flagged reserved; the IPv4 is what counts
                return None
        if addr.scope_id:  # fe80::1%eth0: the zone id does not change what the address is
            addr = ipaddress.IPv6Address(str(addr).split("%")[0])
    if addr in METADATA_ADDRESSES:
        return "cloud metadata"
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_multicast:
        return "multicast"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if addr.is_reserved:  # before is_private, which also covers 240.0.0.0/4
        return "reserved"
    if addr.is_private:
        return "private"
    if not addr.is_global:
        return "non-public"
    return None


def parse_legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """Read ``host`` the way inet_aton does (1-4 dot-separated decimal/octal/hex parts), or ``None``."""
    labels = host.split(".")
    if not 1 <= len(labels) <= 4 or not all(_NUMERIC_LABEL.match(label) for label in labels):
        return None
    try:
        values = [_inet_aton_part(label) for label in labels]
    except ValueError:  # e.g. '09': not octal, and inet_aton refuses it too
        return None
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    number = 0
    for v in head:
        number = number * 256 + v
    number = number * 256 ** (4 - len(head)) + last
    return ipaddress.IPv4Address(number)


def _inet_aton_part(label: str) -> int:
    lowered = label.lower()
    if lowered.startswith("0x"):
        return int(lowered[2:] or "0", 16)
    if len(label) > 1 and label.startswith("0"):
        return int(label, 8)
    return int(label)


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


# --- host rules -----------------------------------------------------------------

@dataclass(frozen=True)
class HostRule:
    """One ``EGM_ALLOWED_HOSTS`` entry."""

    host: str  # lowercase; '*' = any host; '*.example.com' = its subdomains
    port: int | None = None

    @classmethod
    def parse(cls, entry: str) -> "HostRule":
        entry = entry.strip().lower()
        if entry == "*":
            return cls("*")
        host, port = _split_host_port(entry)
        return cls(_normalize_host(host), port)

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.host == "*":
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return _same_host(self.host, host)


def _split_host_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [v6]:port
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, int(port) if port.isdigit() else None
    return entry, None


def _normalize_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def _same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


# --- the guard ------------------------------------------------------------------

@dataclass(frozen=True)
class PinnedRequest:
    """What to hand httpx so that it connects to one vetted address: ``client.stream("GET", url,
    headers=headers, extensions=extensions)``."""

    url: str
    headers: dict[str, str]
    extensions: dict[str, str]


@dataclass(frozen=True)
class VettedUrl:
    url: str
    scheme: str
    host: str
    port: int
    #: the resolved addresses that passed the check, in resolver order (never empty).
    addresses: tuple[str, ...]
    is_label_studio: bool

    def pinned(self, address: str | None = None) -> PinnedRequest:
        """A request for this URL that connects to ``address`` (default: the first vetted one)."""
        address = address or self.addresses[0]
        if address not in self.addresses:
            raise BlockedUrlError(f"address {address} was not vetted for {redact_url(self.url)}")
        parts = urlsplit(self.url)
        userinfo = parts.netloc.rpartition("@")[0] + "@" if "@" in parts.netloc else ""
        ip_host = f"[{address}]" if ":" in address else address
        ip_url = urlunsplit((parts.scheme, f"{userinfo}{ip_host}:{self.port}", parts.path or "/", parts.query, ""))
        host_header = _idna(self.host)
        if ":" in host_header:
            host_header = f"[{host_header}]"
        if self.port != DEFAULT_PORTS[self.scheme]:
            host_header += f":{self.port}"
        extensions = {"sni_hostname": _idna(self.host)} if self.scheme == "https" else {}
        return PinnedRequest(ip_url, {"Host": host_header}, extensions)


def _idna(host: str) -> str:
    try:
        return host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        return host


class UrlGuard:
    """Decides whether a worker may fetch a URL (see the module docstring)."""

    def __init__(self, label_studio_url: str | None, allowed_hosts: str | Iterable[str] = "",
                 allow_private_networks: bool = False, resolver: Resolver | None = None) -> None:
        self.allow_private_networks = allow_private_networks
        self._resolve = resolver or _system_resolver
        entries = allowed_hosts.split(",") if isinstance(allowed_hosts, str) else list(allowed_hosts)
        self.rules = tuple(HostRule.parse(e) for e in entries if e.strip())
        self.label_studio_origin = _safe_origin(label_studio_url) if label_studio_url else None

    @classmethod
    def from_settings(cls, settings, resolver: Resolver | None = None) -> "UrlGuard":
        return cls(settings.label_studio_url, settings.allowed_hosts, settings.allow_private_networks, resolver)

    def is_label_studio_url(self, url: str) -> bool:
        """Whether ``url`` is on Label Studio's origin (such URLs are downloaded with the Label Studio client)."""
        try:
            return self.label_studio_origin is not None and _origin(url) == self.label_studio_origin
        except BlockedUrlError:
            return False

    def check(self, url: str) -> None:
        """Raise :class:`BlockedUrlError` unless ``url`` may be fetched."""
        self.vet(url)

    def vet(self, url: str) -> VettedUrl:
        """Check ``url`` and return it with the addresses a connection may use."""
        scheme, host, port = _parse(url)
        shown = redact_url(url)
        if parse_legacy_ipv4(host) is not None and not _is_canonical_ip(host):
            raise BlockedUrlError(f"refused {shown}: numeric host '{host}' is not a dotted-quad IP address")
        is_ls = (host, port) == self.label_studio_origin if self.label_studio_origin else False
        if not is_ls and not any(rule.matches(host, port) for rule in self.rules):
            raise BlockedUrlError(
                f"refused {shown}: host '{host}' is neither Label Studio's host nor listed in EGM_ALLOWED_HOSTS")
        addresses = self._addresses(host, port, shown)
        if not is_ls:
            for address in addresses:
                self._check_address(address, host, shown)
        return VettedUrl(url, scheme, host, port, tuple(str(a) for a in addresses), is_ls)

    def _addresses(self, host: str, port: int, shown: str) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        try:
            raw = self._resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise UrlResolveError(f"cannot resolve host '{host}' of {shown}: {exc}") from None
        out: list[IPAddress] = []
        for text in raw:
            addr = ipaddress.ip_address(text.split("%")[0])
            if addr not in out:
                out.append(addr)
        if not out:
            raise UrlResolveError(f"host '{host}' of {shown} resolved to no address")
        return out

    def _check_address(self, address: IPAddress, host: str, shown: str) -> None:
        category = address_category(address)
        if category is None:
            return
        if category in ALWAYS_REFUSED or not self.allow_private_networks:
            hint = "" if category in ALWAYS_REFUSED else "; set EGM_ALLOW_PRIVATE_NETWORKS=true to allow it"
            raise BlockedUrlError(f"refused {shown}: {_describe(address, host)} is a {category} address{hint}")


def _describe(address: IPAddress, host: str) -> str:
    """'10.0.0.1', 'host (10.0.0.1)', '::ffff:a00:1 (IPv4-mapped 10.0.0.1)'."""
    text = str(address)
    embedded = _embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
    if embedded is not None:
        text += f" ({embedded[1]} {embedded[0]})"
    if not _same_host(host, str(address)):
        text = f"'{host}' -> {text}"
    return text


def _parse(url: str) -> tuple[str, str, int]:
    """scheme, normalized host, effective port; refuses what is not a plain http(s) URL."""
    if not isinstance(url, str) or not url.strip():
        raise BlockedUrlError("refused an empty URL")
    shown = redact_url(url)
    if any(ord(c) < 33 for c in url.strip()):
        raise BlockedUrlError(f"refused {shown}: URL contains whitespace or control characters")
    try:
        parts = urlsplit(url.strip())
        hostname, explicit_port = parts.hostname, parts.port
    except ValueError as exc:  # bad port or brackets
        raise BlockedUrlError(f"refused {shown}: malformed URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise BlockedUrlError(f"refused {shown}: scheme '{scheme or '(none)'}' is not http or https")
    host = _normalize_host(hostname or "")
    port = explicit_port or DEFAULT_PORTS[scheme]
    if not host:
        raise BlockedUrlError(f"refused {shown}: URL has no host")
    return scheme, host, port


def _origin(url: str) -> tuple[str, int]:
    _, host, port = _parse(url)
    return host, port


def _safe_origin(url: str) -> tuple[str, int] | None:
    try:
        return _origin(url)
    except BlockedUrlError:  # a malformed LABEL_STUDIO_URL means no host is Label Studio's
        return None


def _is_canonical_ip(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        return False
