"""Image loading: EXIF orientation, hostile and odd files, every source kind, batch isolation."""

from __future__ import annotations

import tempfile

import hashlib
import os
import socket

import pytest
from PIL import Image

from egm.config.settings import Settings
from egm.geometry import upright_size
from tests import images_factory as f
from tests.image_server import ImageServer, Route
from egm.images import ImageLoadError, LoadedImage, fetch_many, load_image

LS_URL = "http://ls.test:8080"


def settings(**overrides) -> Settings:
    values = {"label_studio_url": LS_URL, "allowed_hosts": "", "allow_private_networks": False,
              "local_files_root": tempfile.gettempdir(), "image_timeout_s": 5.0, "max_image_bytes": 5 * 1024 * 1024,
              "max_image_pixels": 64_000_000, "label_studio_api_key": None}
    values.update(overrides)
    return Settings(**values)


def load_bytes(data: bytes, tmp_path, name: str = "img.bin", **overrides) -> LoadedImage:
    path = tmp_path / name
    path.write_bytes(data)
    return load_image(str(path), settings=settings(**overrides))


def load_error(data: bytes, tmp_path, name: str = "img.bin", **overrides) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_bytes(data, tmp_path, name, **overrides)
    return info.value


# --- EXIF orientation ------------------------------------------------------------

#: EXIF 2.3, tag 274: where each corner of the STORED pixel array appears once the image
#: is shown upright (e.g. 6 = "0th row is the visual right-hand side, 0th column the visual top").
EXIF_CORNERS = {
    1: {"tl": "tl", "tr": "tr", "bl": "bl", "br": "br"},
    2: {"tl": "tr", "tr": "tl", "bl": "br", "br": "bl"},
    3: {"tl": "br", "tr": "bl", "bl": "tr", "br": "tl"},
    4: {"tl": "bl", "tr": "br", "bl": "tl", "br": "tr"},
    5: {"tl": "tl", "tr": "bl", "bl": "tr", "br": "br"},
    6: {"tl": "tr", "tr": "br", "bl": "tl", "br": "bl"},
    7: {"tl": "br", "tr": "tr", "bl": "bl", "br": "tl"},
    8: {"tl": "bl", "tr": "tl", "bl": "br", "br": "tr"},
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_upright_size_and_pixels(orientation, tmp_path):
    stored_w, stored_h = 48, 32
    loaded = load_bytes(f.make_jpeg(stored_w, stored_h, orientation), tmp_path, "photo.jpg")
    swapped = orientation >= 5
    assert (loaded.width, loaded.height) == ((stored_h, stored_w) if swapped else (stored_w, stored_h))
    assert loaded.image.size == (loaded.width, loaded.height)
    assert (loaded.width, loaded.height) == upright_size(stored_w, stored_h, orientation)
    assert loaded.orientation == orientation and loaded.image.mode == "RGB"
    centers = f.quadrant_centers(loaded.width, loaded.height)
    for stored_corner, upright_corner in EXIF_CORNERS[orientation].items():
        pixel = loaded.image.getpixel(centers[upright_corner])
        assert f.close_to(pixel, f.QUADRANT_COLORS[stored_corner]), (stored_corner, upright_corner, pixel)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_make_upright_jpeg_round_trips(orientation, tmp_path):
    loaded = load_bytes(f.make_upright_jpeg(40, 24, orientation), tmp_path)
    assert loaded.image.size == (40, 24)
    for corner, xy in f.quadrant_centers(40, 24).items():
        assert f.close_to(loaded.image.getpixel(xy), f.QUADRANT_COLORS[corner])


def test_orientation_is_read_from_png_and_webp_exif_too(tmp_path):
    stored = f.quadrant_image(30, 20)
    for fmt in ("PNG", "WEBP"):
        data = f.encode(stored, fmt, exif=f.exif_bytes(6), **({"lossless": True} if fmt == "WEBP" else {}))
        loaded = load_bytes(data, tmp_path)
        assert (loaded.width, loaded.height, loaded.orientation) == (20, 30, 6)
        assert f.close_to(loaded.image.getpixel((15, 5)), f.QUADRANT_COLORS["tl"])  # stored TL -> upright TR


def test_out_of_range_orientation_is_ignored(tmp_path):
    exif = Image.Exif()
    exif[f.ORIENTATION_TAG] = 9
    data = f.encode(f.quadrant_image(30, 20), "JPEG", exif=exif.tobytes())
    loaded = load_bytes(data, tmp_path)
    assert (loaded.width, loaded.height, loaded.orientation) == (30, 20, 1)


# --- malformed and hostile files ------------------------------------------------------

@pytest.mark.parametrize("make, kind, words", [
    (lambda: f.ZERO_BYTES, "decode", "0 bytes"),
    (f.make_truncated_jpeg, "decode", "truncated JPEG"),
    (f.make_truncated_png, "decode", "truncated PNG"),
    (lambda: f.make_jpeg(32, 32)[:40], "decode", "JPEG"),
    (lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, "decode", "corrupt PNG"),
    (f.make_bomb_png, "too_large", "too large"),
    (lambda: f.make_bomb_png(9_000, 9_000), "too_large", "9000x9000"),
    (f.make_svg, "unsupported", "SVG is not a raster image"),
    (lambda: b"  \n" + f.make_svg(), "unsupported", "SVG"),
    (f.make_html, "unsupported", "HTML"),
    (lambda: b"%PDF-1.7\n%binary\n1 0 obj", "unsupported", "PDF"),
    (lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "unsupported", "PostScript"),
    (lambda: b'{"not": "an image"}', "unsupported", "JSON"),
    (lambda: b"plain words, no image here at all", "unsupported", "unsupported image format"),
])
def test_bad_files_fail_with_the_right_kind_and_message(make, kind, words, tmp_path):
    error = load_error(make(), tmp_path, "looks_like.jpg")
    assert error.kind == kind
    assert words in str(error)
    assert "looks_like.jpg" in str(error)  # names the image


def test_pixel_cap_is_checked_before_decoding(tmp_path):
    error = load_error(f.make_png(40, 40), tmp_path, max_image_pixels=1000)
    assert error.kind == "too_large"
    assert "1,600 pixels" in str(error) and "1,000" in str(error) and "EGM_MAX_IMAGE_PIXELS" in str(error)


def test_pillow_hard_bomb_limit_is_reported_as_too_large_even_with_a_huge_cap(tmp_path):
    error = load_error(f.make_bomb_png(200_000, 200_000), tmp_path, max_image_pixels=10**12)
    assert error.kind == "too_large" and "decompression" in str(error)


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_pillow_bomb_warning_as_error_is_too_large(tmp_path):
    # 10000 x 10000 is between Pillow's warning and error limits: with warnings as errors
    # Pillow raises its warning from open(); it must still come out as too_large.
    error = load_error(f.make_bomb_png(10_000, 10_000), tmp_path, max_image_pixels=10**12)
    assert error.kind == "too_large"


def test_formats_outside_the_allowlist_are_unsupported(tmp_path):
    ico = f.encode(Image.new("RGB", (16, 16), f.RED), "ICO")
    error = load_error(ico, tmp_path, "favicon.ico")
    assert error.kind == "unsupported"


# --- modes ------------------------------------------------------------------------------

def test_cmyk_jpeg_becomes_rgb(tmp_path):
    loaded = load_bytes(f.make_cmyk_jpeg(), tmp_path)
    assert loaded.image.mode == "RGB" and f.close_to(loaded.image.getpixel((5, 5)), (255, 0, 0))


@pytest.mark.parametrize("data, grey", [
    (f.make_16bit_png(value=0x8000), 128),
    (f.make_16bit_png(value=0xFFFF), 255),
    (f.make_16bit_tiff(value=0xC000), 191),
])
def test_16_bit_grey_is_scaled_not_clipped(data, grey, tmp_path):
    loaded = load_bytes(data, tmp_path)
    r, g, b = loaded.image.getpixel((3, 3))
    assert loaded.image.mode == "RGB" and r == g == b and abs(r - grey) <= 1


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    loaded = load_bytes(f.make_palette_alpha_png(32, 16), tmp_path)
    assert loaded.image.getpixel((4, 8)) == f.WHITE
    assert f.close_to(loaded.image.getpixel((28, 8)), f.RED, tol=2)


@pytest.mark.parametrize("data, expected", [
    (f.make_la_png(grey=0, alpha=0), (255, 255, 255)),
    (f.make_la_png(grey=50, alpha=255), (50, 50, 50)),
    (f.make_rgba_png(color=(0, 0, 255), alpha=128), (127, 127, 255)),
    (f.make_png(8, 8, "RGBA", (10, 200, 10, 0)), (255, 255, 255)),
    (f.make_png(8, 8, "L", 77), (77, 77, 77)),
    (f.make_png(8, 8, "1", 1), (255, 255, 255)),
])
def test_alpha_and_grey_modes(data, expected, tmp_path):
    pixel = load_bytes(data, tmp_path).image.getpixel((2, 2))
    assert f.close_to(pixel, expected, tol=2), pixel


def test_animated_gif_gives_its_first_frame(tmp_path):
    loaded = load_bytes(f.make_animated_gif(colors=(f.RED, f.BLUE, f.GREEN)), tmp_path, "anim.gif")
    assert loaded.format == "GIF" and f.close_to(loaded.image.getpixel((4, 4)), f.RED)


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF", "GIF", "PPM"])
def test_other_raster_formats_load(fmt, tmp_path):
    loaded = load_bytes(f.make_image(10, 6, fmt, color=f.BLUE), tmp_path)
    assert (loaded.width, loaded.height, loaded.format) == (10, 6, fmt)
    assert f.close_to(loaded.image.getpixel((5, 3)), f.BLUE)


def test_wrong_extension_is_fine_when_the_content_is_an_image(tmp_path):
    loaded = load_bytes(f.make_png(12, 7), tmp_path, "actually_a_png.jpg")
    assert loaded.format == "PNG" and (loaded.width, loaded.height) == (12, 7)


def test_sha256_is_of_the_original_bytes(tmp_path):
    data = f.make_jpeg(20, 10, orientation=6)
    loaded = load_bytes(data, tmp_path)
    assert loaded.sha256 == hashlib.sha256(data).hexdigest()
    assert load_image(f.to_data_url(data, "image/jpeg"), settings=settings()).sha256 == loaded.sha256


# --- data: URLs ---------------------------------------------------------------------------

def test_data_url_base64():
    loaded = load_image(f.to_data_url(f.make_png(9, 5)), settings=settings())
    assert (loaded.width, loaded.height) == (9, 5)


def test_data_url_with_whitespace_and_missing_padding():
    url = f.to_data_url(f.make_png(3, 3)).rstrip("=")
    url = url[:40] + "\n " + url[40:]
    assert load_image(url, settings=settings()).width == 3


@pytest.mark.parametrize("url, kind, words", [
    ("data:image/png;base64,@@@not base64@@@", "decode", "invalid base64"),
    ("data:image/png;base64", "decode", "malformed data: URL"),
    ("data:image/svg+xml,%3Csvg%20xmlns%3D%22http%3A//www.w3.org/2000/svg%22/%3E", "unsupported", "SVG"),
    ("data:image/png;base64,", "decode", "0 bytes"),
])
def test_bad_data_urls(url, kind, words):
    with pytest.raises(ImageLoadError) as info:
        load_image(url, settings=settings())
    assert info.value.kind == kind and words in str(info.value)


def test_data_url_over_the_byte_cap_is_refused_before_decoding():
    with pytest.raises(ImageLoadError) as info:
        load_image(f.to_data_url(f.make_noise_jpeg(64, 64)), settings=settings(max_image_bytes=1000))
    assert info.value.kind == "too_large" and "EGM_MAX_IMAGE_BYTES" in str(info.value)


# --- local paths ----------------------------------------------------------------------------

@pytest.fixture
def media_root(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(f.make_png(6, 4))
    (tmp_path / "secret.png").write_bytes(f.make_png(5, 5))
    return root


def test_local_paths_under_the_root_load(media_root):
    s = settings(local_files_root=str(media_root))
    assert load_image("sub/a.png", settings=s).width == 6
    assert load_image(str(media_root / "sub" / "a.png"), settings=s).width == 6
    assert load_image(f"file://{media_root}/sub/a.png", settings=s).width == 6


@pytest.mark.parametrize("ref", [
    "../secret.png", "sub/../../secret.png", "{tmp}/secret.png", "file://{tmp}/secret.png",
    "file://{tmp}/media/../secret.png", "/etc/passwd", "sub/a.png\x00.jpg",
])
def test_local_paths_outside_the_root_are_refused(ref, media_root):
    with pytest.raises(ImageLoadError) as info:
        load_image(ref.format(tmp=media_root.parent), settings=settings(local_files_root=str(media_root)))
    assert info.value.kind == "blocked"
    assert "EGM_LOCAL_FILES_ROOT" in str(info.value) or "traversal" in str(info.value) or "NUL" in str(info.value)


def test_symlink_out_of_the_root_is_refused(media_root):
    os.symlink(media_root.parent / "secret.png", media_root / "link.png")
    with pytest.raises(ImageLoadError) as info:
        load_image("link.png", settings=settings(local_files_root=str(media_root)))
    assert info.value.kind == "blocked"


def test_without_a_root_local_paths_are_refused(media_root):
    with pytest.raises(ImageLoadError) as info:
        load_image(str(media_root / "sub" / "a.png"), settings=settings(local_files_root=None))
    assert info.value.kind == "blocked" and "EGM_LOCAL_FILES_ROOT" in str(info.value)


def test_traversal_is_refused_under_a_root(media_root):
    with pytest.raises(ImageLoadError) as info:
        load_image(str(media_root / "sub" / ".." / ".." / "x.png"), settings=settings(local_files_root=str(media_root)))
    assert info.value.kind == "blocked"


def test_missing_file_and_remote_file_url(media_root):
    s = settings(local_files_root=str(media_root))
    with pytest.raises(ImageLoadError) as info:
        load_image("sub/nope.png", settings=s)
    assert info.value.kind == "fetch" and "not found" in str(info.value)
    with pytest.raises(ImageLoadError) as info:
        load_image("file://fileserver/share/a.png", settings=s)
    assert info.value.kind == "blocked"


def test_local_file_over_the_byte_cap(media_root):
    with pytest.raises(ImageLoadError) as info:
        load_image("sub/a.png", settings=settings(local_files_root=str(media_root), max_image_bytes=10))
    assert info.value.kind == "too_large"


@pytest.mark.parametrize("ref", ["ftp://example.com/a.jpg", "s3://bucket/a.jpg", "gs://bucket/a.jpg"])
def test_other_schemes_are_blocked(ref):
    with pytest.raises(ImageLoadError) as info:
        load_image(ref, settings=settings())
    assert info.value.kind == "blocked" and "scheme" in str(info.value)


# --- Label Studio media -------------------------------------------------------------------

class RecordingDownloader:
    """Stands in for egm.labelstudio.LabelStudioClient: serves fixed bytes and records calls."""

    def __init__(self, data: bytes = b"", error: Exception | None = None) -> None:
        self.data, self.error, self.calls = data, error, []

    def download(self, url: str, max_bytes: int) -> bytes:
        self.calls.append((url, max_bytes))
        if self.error:
            raise self.error
        return self.data


@pytest.mark.parametrize("ref", ["/data/upload/3/cat.png", f"{LS_URL}/data/upload/3/cat.png"])
def test_label_studio_uploads_go_through_the_client(ref):
    client = RecordingDownloader(f.make_png(7, 3))
    loaded = load_image(ref, settings=settings(), ls_client=client)
    assert (loaded.width, loaded.height) == (7, 3)
    assert client.calls == [(f"{LS_URL}/data/upload/3/cat.png", 5 * 1024 * 1024)]


def test_label_studio_local_files_are_read_from_disk_when_present(media_root):
    client = RecordingDownloader(f.make_png(1, 1))
    s = settings(local_files_root=str(media_root))
    assert load_image("/data/local-files/?d=sub/a.png", settings=s, ls_client=client).width == 6
    assert client.calls == []
    assert load_image("/data/local-files/?d=sub/elsewhere.png", settings=s, ls_client=client).width == 1
    assert client.calls == [(f"{LS_URL}/data/local-files/?d=sub/elsewhere.png", s.max_image_bytes)]


def test_label_studio_local_files_traversal_is_refused(media_root):
    client = RecordingDownloader(f.make_png(1, 1))
    with pytest.raises(ImageLoadError) as info:
        load_image("/data/local-files/?d=../secret.png", settings=settings(local_files_root=str(media_root)),
                   ls_client=client)
    assert info.value.kind == "blocked" and client.calls == []


def test_label_studio_media_without_a_client_is_a_clear_error():
    with pytest.raises(ImageLoadError) as info:
        load_image("/data/upload/1/a.png", settings=settings())
    assert info.value.kind == "fetch" and "Label Studio client" in str(info.value)


def test_label_studio_client_errors_never_echo_the_token():
    client = RecordingDownloader(error=RuntimeError("401 for token Sup3rSecretTok"))
    with pytest.raises(ImageLoadError) as info:
        load_image("/data/upload/1/a.png", settings=settings(label_studio_api_key="Sup3rSecretTok"), ls_client=client)
    assert info.value.kind == "fetch" and "401" in str(info.value) and "Sup3rSecretTok" not in str(info.value)


def test_label_studio_client_byte_cap_error_is_too_large():
    client = RecordingDownloader(error=RuntimeError("GET /data/upload/1/a.jpg: file is over the 500-byte limit"))
    with pytest.raises(ImageLoadError) as info:
        load_image("/data/upload/1/a.jpg", settings=settings(max_image_bytes=500), ls_client=client)
    assert info.value.kind == "too_large" and "500-byte limit" in str(info.value)


def test_label_studio_oversized_download_is_too_large():
    client = RecordingDownloader(f.make_noise_jpeg(64, 64))
    with pytest.raises(ImageLoadError) as info:
        load_image("/data/upload/1/a.jpg", settings=settings(max_image_bytes=500), ls_client=client)
    assert info.value.kind == "too_large"


# --- http(s) ---------------------------------------------------------------------------------

PNG = f.make_png(8, 6)
BIG = f.make_noise_jpeg(256, 256)


@pytest.fixture
def server():
    routes = {
        "/ok.png": Route(200, PNG, {"Content-Type": "image/png"}),
        "/ok-no-ext": Route(200, f.make_jpeg(10, 20, orientation=8)),
        "/500": Route(500, b"boom"),
        "/slow.png": Route(200, PNG, hang=True),
        "/redirect": Route(302, headers={"Location": "/ok.png"}),
        "/loop": Route(302, headers={"Location": "/loop"}),
        "/big-chunked": Route(200, BIG, chunked=True),
        "/big-declared": Route(200, b"x" * 100, {"Content-Length": str(10**9)}),
        "/login": Route(200, f.make_html(), {"Content-Type": "text/html"}),
    }
    with ImageServer(routes) as srv:
        yield srv


def http_settings(**overrides) -> Settings:
    return settings(**{"allowed_hosts": "127.0.0.1", "allow_private_networks": True, **overrides})


def http_error(url: str, **overrides) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(url, settings=http_settings(**overrides))
    return info.value


def test_http_200(server):
    loaded = load_image(server.url("/ok.png"), settings=http_settings())
    assert (loaded.width, loaded.height) == (8, 6) and loaded.sha256 == hashlib.sha256(PNG).hexdigest()


def test_http_image_without_extension_and_with_exif(server):
    loaded = load_image(server.url("/ok-no-ext"), settings=http_settings())
    assert (loaded.width, loaded.height, loaded.orientation) == (20, 10, 8)


def test_http_redirect_is_followed(server):
    assert load_image(server.url("/redirect"), settings=http_settings()).width == 8
    assert [p for p, _ in server.requests] == ["/redirect", "/ok.png"]


def test_http_404_names_status_and_redacts_the_url(server):
    error = http_error(server.url("/missing.png?token=Tok3nValue&d=a.png").replace("http://", "http://bob:Pw0rd@"))
    assert error.kind == "fetch" and "HTTP 404" in str(error) and "/missing.png" in str(error)
    assert "Tok3nValue" not in str(error) and "Pw0rd" not in str(error)


def test_http_500(server):
    error = http_error(server.url("/500"))
    assert error.kind == "fetch" and "HTTP 500" in str(error)


def test_http_timeout(server):
    error = http_error(server.url("/slow.png"), image_timeout_s=0.3)
    assert error.kind == "fetch" and "timed out" in str(error)


def test_http_connection_refused():
    with socket.socket() as sock:  # a port nobody listens on once this socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    error = http_error(f"http://127.0.0.1:{port}/a.png")
    assert error.kind == "fetch" and "could not connect" in str(error)


def test_http_redirect_loop_stops(server):
    error = http_error(server.url("/loop"))
    assert error.kind == "fetch" and "too many redirects" in str(error)
    assert len(server.requests) == 6  # the first request and 5 redirects


@pytest.mark.parametrize("path", ["/big-chunked", "/big-declared"])
def test_http_byte_cap(path, server):
    error = http_error(server.url(path), max_image_bytes=len(BIG) // 4)
    assert error.kind == "too_large" and "EGM_MAX_IMAGE_BYTES" in str(error)


def test_http_html_login_page_is_unsupported(server):
    error = http_error(server.url("/login"))
    assert error.kind == "unsupported" and "HTML" in str(error)


def test_loopback_server_is_refused_by_default(server):
    with pytest.raises(ImageLoadError) as info:
        load_image(server.url("/ok.png"), settings=settings())
    assert info.value.kind == "blocked" and "EGM_ALLOWED_HOSTS" in str(info.value)
    with pytest.raises(ImageLoadError) as info:
        load_image(server.url("/ok.png"), settings=settings(allowed_hosts="127.0.0.1"))
    assert info.value.kind == "blocked" and "loopback" in str(info.value)
    assert server.requests == []


def test_redirect_to_metadata_is_blocked(server):
    server.routes["/evil"] = Route(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
    error = http_error(server.url("/evil"), allowed_hosts="*")
    assert error.kind == "blocked" and "cloud metadata" in str(error)


def test_label_studio_origin_url_uses_the_client_not_plain_http(server):
    client = RecordingDownloader(PNG)
    ls = server.url("")
    loaded = load_image(f"{ls}/data/upload/1/x.png", settings=settings(label_studio_url=ls), ls_client=client)
    assert loaded.width == 8 and len(client.calls) == 1 and server.requests == []


# --- batches ------------------------------------------------------------------------------------

def test_fetch_many_isolates_failures(server, media_root):
    s = http_settings(local_files_root=str(media_root))
    sources = [server.url("/ok.png"), server.url("/500"), f.to_data_url(f.make_svg(), "image/svg+xml"),
               "sub/a.png", "../secret.png", None, f.to_data_url(f.make_png(2, 2))]
    results = fetch_many(sources, settings=s, max_workers=3)
    assert len(results) == len(sources)
    kinds = [r.kind if isinstance(r, ImageLoadError) else (r.width, r.height) for r in results]
    assert kinds == [(8, 6), "fetch", "unsupported", (6, 4), "blocked", "fetch", (2, 2)]
    assert results[0].source == sources[0]


def test_fetch_many_empty():
    assert fetch_many([], settings=settings()) == []


def test_image_load_error_pickles():
    import pickle

    error = pickle.loads(pickle.dumps(ImageLoadError("bad thing", "decode")))
    assert (error.kind, str(error)) == ("decode", "bad thing")


def test_real_label_studio_client_downloads_media(server):
    """egm.labelstudio.LabelStudioClient satisfies the downloader protocol; the test server plays
    Label Studio's media route."""
    from egm.labelstudio import LabelStudioClient

    server.routes["/data/upload/1/a.png"] = Route(200, PNG)
    ls = server.url("")
    client = LabelStudioClient(ls, "legacy-token-for-tests", retries=0)
    loaded = load_image("/data/upload/1/a.png", settings=settings(label_studio_url=ls), ls_client=client)
    assert (loaded.width, loaded.height) == (8, 6)
    with pytest.raises(ImageLoadError) as info:
        load_image("/data/upload/1/gone.png", settings=settings(label_studio_url=ls), ls_client=client)
    assert info.value.kind == "fetch" and "404" in str(info.value) and "legacy-token-for-tests" not in str(info.value)
