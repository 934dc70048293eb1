"""The SSRF guard: what image URLs a worker may fetch, and that connections go where it checked."""

from __future__ import annotations

import pytest

from tests.image_server import ImageServer, Route
from tests.images_factory import make_png
from egm.images.errors import ImageLoadError
from egm.images.sources import http_get_bytes
from egm.images.url_guard import BlockedUrlError, UrlGuard, UrlResolveError, parse_legacy_ipv4
from egm.redaction import redact_url

LS = "http://127.0.0.1:8080"
PUBLIC = "93.184.216.34"


def fixed_resolver(table: dict[str, list[str]]):
    """Resolve from a table (no network); unknown names fail like DNS does."""
    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError(f"unknown host {host}")
        return table[host]
    return resolve


def guard(allowed: str = "*", private: bool = False, table: dict[str, list[str]] | None = None) -> UrlGuard:
    return UrlGuard(LS, allowed, private, resolver=fixed_resolver(table) if table is not None else None)


def refused(g: UrlGuard, url: str) -> str:
    with pytest.raises(BlockedUrlError) as info:
        g.check(url)
    return str(info.value)


# --- schemes and hosts ------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "ftp://example.com/a.jpg", "file:///etc/passwd", "gopher://example.com/", "javascript:alert(1)",
    "data:image/png;base64,AAAA", "//example.com/a.jpg", "s3://bucket/key.jpg",
])
def test_refuses_non_http_schemes(url):
    assert "is not http or https" in refused(guard(), url)


@pytest.mark.parametrize("url", ["", "   ", "http:///nohost.jpg", "http://[::1/", "http://example.com:99999/",
                                 "http://exa mple.com/a.jpg"])
def test_refuses_malformed_urls(url):
    message = refused(guard(), url)
    assert message.startswith("refused")


def test_refuses_hosts_that_are_not_configured():
    g = guard(allowed="", table={"example.com": [PUBLIC]})
    message = refused(g, "http://example.com/cat.jpg")
    assert "EGM_ALLOWED_HOSTS" in message and "example.com" in message


def test_allows_label_studio_host_even_on_loopback():
    g = guard(allowed="")
    vetted = g.vet(f"{LS}/data/upload/1/cat.jpg")
    assert vetted.is_label_studio and vetted.addresses == ("127.0.0.1",)
    assert g.is_label_studio_url(f"{LS}/data/local-files/?d=a.jpg")


def test_label_studio_host_on_another_port_is_not_label_studio():
    # Redis on 127.0.0.1:6379 must not ride on Label Studio's exemption.
    g = guard(allowed="")
    assert not g.is_label_studio_url("http://127.0.0.1:6379/")
    assert "EGM_ALLOWED_HOSTS" in refused(g, "http://127.0.0.1:6379/")


def test_allows_configured_public_hosts():
    table = {"images.example.com": [PUBLIC], "a.cdn.example": [PUBLIC], "cdn.example": [PUBLIC],
             "other.example": [PUBLIC]}
    g = guard(allowed="Images.Example.com., *.cdn.example, other.example:8443", table=table)
    assert g.vet("https://images.example.com/x.jpg").addresses == (PUBLIC,)
    g.check("http://a.cdn.example/x.jpg")
    g.check("https://other.example:8443/x.jpg")
    assert "EGM_ALLOWED_HOSTS" in refused(g, "http://cdn.example/x.jpg")  # the wildcard means subdomains
    assert "EGM_ALLOWED_HOSTS" in refused(g, "https://other.example/x.jpg")  # wrong port


def test_star_allows_any_public_host_but_not_private_ones():
    g = guard(allowed="*", table={"anything.example": [PUBLIC], "intranet.example": ["10.1.2.3"]})
    g.check("https://anything.example/a.png")
    assert "private" in refused(g, "https://intranet.example/a.png")


def test_unresolvable_host_is_a_resolve_error():
    g = guard(table={})
    with pytest.raises(UrlResolveError, match="cannot resolve host 'nowhere.example'"):
        g.check("http://nowhere.example/a.jpg")


# --- addresses --------------------------------------------------------------------

@pytest.mark.parametrize("url, category", [
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "cloud metadata"),
    ("http://169.254.1.1/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://127.0.0.1/", "loopback"),
    ("http://127.9.9.9:8080/", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://10.0.0.1/", "private"),
    ("http://172.16.5.4/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://[fd12:3456::1]/", "private"),
    ("http://100.64.0.1/", "non-public"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
])
def test_refuses_non_public_addresses(url, category):
    assert f"is a {category} address" in refused(guard(), url)


@pytest.mark.parametrize("url, inner", [
    ("http://[::ffff:127.0.0.1]/", "IPv4-mapped 127.0.0.1"),
    ("http://[::ffff:169.254.169.254]/", "IPv4-mapped 169.254.169.254"),
    ("http://[::ffff:10.0.0.1]/", "IPv4-mapped 10.0.0.1"),
    ("http://[2002:7f00:1::1]/", "6to4 127.0.0.1"),
    ("http://[2002:c0a8:101::1]/", "6to4 192.168.1.1"),
    ("http://[64:ff9b::7f00:1]/", "NAT64 127.0.0.1"),
])
def test_refuses_ipv6_addresses_that_embed_internal_ipv4(url, inner):
    assert inner in refused(guard(), url)


def test_ipv6_embedding_a_public_ipv4_is_public():
    guard().check("http://[::ffff:93.184.216.34]/a.jpg")


@pytest.mark.parametrize("url", [
    "http://2130706433/", "http://0x7f000001/", "http://0x7f.1/", "http://0177.0.0.1/", "http://127.1/",
    "http://3232235777/", "http://017700000001/", "http://0x7F.0.0.1/",
])
def test_refuses_integer_octal_hex_hosts_whatever_the_configuration(url):
    assert "not a dotted-quad" in refused(guard(allowed="*", private=True), url)


def test_legacy_ipv4_parsing_matches_inet_aton():
    assert str(parse_legacy_ipv4("2130706433")) == "127.0.0.1"
    assert str(parse_legacy_ipv4("0x7f.1")) == "127.0.0.1"
    assert str(parse_legacy_ipv4("0177.0.0.01")) == "127.0.0.1"
    assert str(parse_legacy_ipv4("192.168.257")) == "192.168.1.1"
    assert parse_legacy_ipv4("1e100.net") is None
    assert parse_legacy_ipv4("256.1.1.1") is None
    assert parse_legacy_ipv4("09.1.1.1") is None


def test_every_resolved_address_must_be_public():
    g = guard(table={"split.example": [PUBLIC, "10.0.0.7"]})
    message = refused(g, "http://split.example/a.jpg")
    assert "'split.example' -> 10.0.0.7 is a private address" in message


def test_hostname_resolving_to_metadata_is_refused():
    g = guard(private=True, table={"metadata.google.internal": ["169.254.169.254"]})
    assert "cloud metadata" in refused(g, "http://metadata.google.internal/computeMetadata/v1/")


def test_real_resolver_refuses_localhost():
    assert "loopback" in refused(UrlGuard(LS, "*", False), "http://localhost/a.jpg")


def test_allow_private_networks_opens_private_but_not_metadata_or_multicast():
    g = guard(allowed="*", private=True)
    for url in ("http://127.0.0.1:9000/", "http://[::1]/", "http://10.0.0.1/", "http://192.168.1.1/",
                "http://169.254.1.1/", "http://[::ffff:10.0.0.1]/"):
        g.check(url)
    for url in ("http://169.254.169.254/", "http://0.0.0.0/", "http://224.0.0.1/"):
        refused(g, url)


def test_refusal_suggests_the_setting_only_where_it_helps():
    assert "EGM_ALLOW_PRIVATE_NETWORKS" in refused(guard(), "http://10.0.0.1/")
    assert "EGM_ALLOW_PRIVATE_NETWORKS" not in refused(guard(), "http://169.254.169.254/")


# --- credentials never echoed ------------------------------------------------------

@pytest.mark.parametrize("url", [
    "ftp://alice:S3cretPass@example.com/a.jpg?token=T0kenValue",
    "http://alice:S3cretPass@10.0.0.1/a.jpg?token=T0kenValue",
    "http://alice:S3cretPass@169.254.169.254/?X-Amz-Signature=T0kenValue",
    "http://alice:S3cretPass@notlisted.example/a.jpg?sig=T0kenValue",
    "http://alice:S3cretPass@2130706433/?token=T0kenValue",
    "http://alice:S3cretPass@example.com:99999/?token=T0kenValue",
])
def test_messages_never_contain_passwords_or_tokens(url):
    message = refused(guard(allowed="", table={"notlisted.example": [PUBLIC]}), url)
    assert "S3cretPass" not in message and "T0kenValue" not in message
    assert "alice" not in message


def test_redact_url():
    assert redact_url("https://u:p@h.example/a.jpg?token=abc&d=x/y.jpg#frag") == \
        "https://***@h.example/a.jpg?token=***&d=x/y.jpg"
    assert redact_url("data:image/png;base64,AAAABBBB").startswith("data:image/png;base64,...")
    assert len(redact_url("http://h/" + "a" * 1000)) <= 200


# --- pinning: the connection goes to the vetted address ---------------------------

def test_pinned_request_targets_vetted_ip_and_keeps_the_name():
    g = guard(table={"images.example.com": [PUBLIC, "2606:2800:220:1::1"]})
    vetted = g.vet("https://images.example.com/path/a.jpg?x=1")
    first = vetted.pinned()
    assert first.url == f"https://{PUBLIC}:443/path/a.jpg?x=1"
    assert first.headers == {"Host": "images.example.com"}
    assert first.extensions == {"sni_hostname": "images.example.com"}
    assert vetted.pinned("2606:2800:220:1::1").url.startswith("https://[2606:2800:220:1::1]:443/")
    with pytest.raises(BlockedUrlError):
        vetted.pinned("10.0.0.1")


def test_fetch_connects_to_the_vetted_address_not_a_fresh_lookup():
    """'images.test' exists only in our resolver: the fetch can only succeed by connecting to the
    address the guard vetted. A second lookup (DNS rebinding) would have answered 10.255.255.1."""
    answers = [["127.0.0.1"], ["10.255.255.1"]]
    calls = []

    def rebinding_resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return answers[min(len(calls), len(answers)) - 1]

    body = make_png(4, 4)
    with ImageServer({"/a.png": Route(200, body)}) as server:
        g = UrlGuard(LS, "images.test", True, resolver=rebinding_resolver)
        data = http_get_bytes(server.url("/a.png", host="images.test"), guard=g, timeout_s=5, max_bytes=10**6)
    assert data == body
    assert calls == ["images.test"]
    assert server.requests == [("/a.png", f"images.test:{server.port}")]


# --- redirects: every hop is checked ------------------------------------------------

@pytest.mark.parametrize("allowed, target, expected", [
    ("*", "http://169.254.169.254/latest/meta-data/iam/", "cloud metadata"),
    ("*", "http://0.0.0.0:{port}/a.png", "unspecified"),
    ("*", "http://2130706433:{port}/a.png", "dotted-quad"),
    ("127.0.0.1", "http://10.1.2.3/a.png", "EGM_ALLOWED_HOSTS"),
    ("*", "gopher://127.0.0.1:6379/_INFO", "is not http or https"),
])
def test_redirect_to_an_internal_address_is_refused(allowed, target, expected):
    with ImageServer({"/a.png": Route(200, make_png(4, 4))}) as server:
        server.routes["/go"] = Route(302, headers={"Location": target.format(port=server.port)})
        g = UrlGuard(LS, allowed, True)  # private networks on, so the test server itself is reachable
        with pytest.raises(ImageLoadError) as info:
            http_get_bytes(server.url("/go"), guard=g, timeout_s=5, max_bytes=10**6)
    assert info.value.kind == "blocked"
    assert expected in str(info.value)
    assert [path for path, _ in server.requests] == ["/go"]  # the internal target was never contacted


def test_redirect_from_an_allowed_host_to_loopback_is_refused():
    """Hop 1 is Label Studio's origin (allowed on loopback); hop 2 is another loopback origin and is refused."""
    with ImageServer({"/a.png": Route(200, make_png(4, 4))}) as server:
        server.routes["/go"] = Route(302, headers={"Location": f"http://localhost:{server.port}/a.png"})
        g = UrlGuard(server.url(""), "*", False)
        assert g.vet(server.url("/go")).is_label_studio
        with pytest.raises(ImageLoadError) as info:
            http_get_bytes(server.url("/go"), guard=g, timeout_s=5, max_bytes=10**6)
    assert info.value.kind == "blocked" and "loopback" in str(info.value)
    assert [path for path, _ in server.requests] == ["/go"]
