"""load_image: every payload form, every limit, and a local HTTP server (127.0.0.1 only) for the URL rules."""
import base64
import http.server
import io
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from plinth.errors import PlinthError
from plinth.vision.image_sources import ImageError, ImageLimits, load_image


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(width: int = 16, height: int = 12, seed: int = 0) -> Image.Image:
    """Random pixels, so PNG cannot compress them away and a cut file is really cut."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def message(payload, limits: ImageLimits = ImageLimits()) -> str:
    with pytest.raises(ImageError) as caught:
        load_image(payload, limits)
    return str(caught.value)


PNG = encoded(noise())


# data: URIs and decoding

def test_png_round_trips_through_a_data_uri():
    image = load_image({"url": data_uri(PNG), "detail": "auto"})
    assert isinstance(image, Image.Image) and image.size == (16, 12)
    assert np.array_equal(np.asarray(image), np.asarray(noise()))


def test_jpeg_round_trips_through_a_data_uri():
    jpeg = encoded(noise(), "JPEG", quality=90)
    image = load_image(data_uri(jpeg, "image/jpeg"))
    assert image.format == "JPEG" and image.size == (16, 12)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(jpeg))))  # lossy, so against Pillow


def test_animated_gif_gives_its_first_frame():
    red, blue = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    image = load_image(data_uri(encoded(red, "GIF", save_all=True, append_images=[blue]), "image/gif"))
    assert image.n_frames == 2 and image.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("detail", ["auto", "low", "high", None])
def test_detail_values_are_accepted(detail):
    part = {"url": data_uri(PNG)} | ({"detail": detail} if detail else {})  # None: left out
    assert load_image(part).size == (16, 12)


def test_other_detail_is_refused():
    text = message({"url": data_uri(PNG), "detail": "medium"})
    assert "'medium'" in text and "auto, low, high" in text


@pytest.mark.parametrize("part", [{}, {"url": 7}, {"image_url": data_uri(PNG)}])
def test_image_url_object_needs_a_string_url(part):
    assert "needs a string 'url'" in message(part)


def test_non_image_mime_is_refused():
    text = message("data:text/plain;base64,aGVsbG8=")
    assert "'text/plain', which is not an image" in text and "data:image/png;base64" in text


def test_non_base64_data_uri_is_refused():
    assert "is not a base64 data: URI" in message("data:image/png,%89PNG")


def test_bad_base64_is_refused():
    assert "not valid base64" in message("data:image/png;base64,iVBOR*w0KGgo=")


def test_oversize_data_uri_is_refused_before_decoding():
    text = message(data_uri(PNG), ImageLimits(max_bytes=100))
    assert f"holds {len(PNG):,} bytes" in text and "limit of 100" in text


def test_error_names_a_data_uri_by_its_start_only():
    uri = data_uri(b"x" * 3000)
    text = message(uri)
    assert uri[:40] in text and uri not in text and len(text) < 300


def test_truncated_png_is_refused():
    cut = encoded(noise(64, 64))[:2000]
    assert "could not be decoded as an image" in message(data_uri(cut))


def test_random_bytes_are_refused():
    junk = np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes()
    assert "could not be decoded as an image" in message(data_uri(junk))


def test_only_web_formats_are_decoded():
    assert load_image(data_uri(encoded(noise(), "BMP"), "image/bmp")).size == (16, 12)
    tiff = data_uri(encoded(noise(), "TIFF"), "image/tiff")  # a decoder chat images need not reach
    assert "could not be decoded as an image" in message(tiff)


def test_pixel_count_is_checked_from_the_header():
    text = message(data_uri(PNG), ImageLimits(max_pixels=16 * 12 - 1))
    assert "16x12 = 192 pixels" in text and "limit of 191" in text
    assert load_image(data_uri(PNG), ImageLimits(max_pixels=16 * 12)).size == (16, 12)


@pytest.mark.parametrize("side", [8, 11])  # 64 pixels: Pillow warns; 121, over twice its limit: Pillow raises
def test_pillow_bomb_guard_ends_as_image_error(monkeypatch, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    filters = list(warnings.filters)
    assert "too large to decode safely" in message(data_uri(encoded(noise(side, side))))
    assert warnings.filters == filters and Image.MAX_IMAGE_PIXELS == 50  # nothing global left changed


# Python objects and local files

def test_pil_image_and_uint8_array_pass_through():
    image = Image.open(io.BytesIO(PNG))
    assert load_image(image) is image and image.getpixel((0, 0)) == noise().getpixel((0, 0))
    array = np.zeros((4, 4, 3), dtype=np.uint8)
    assert load_image(array) is array


@pytest.mark.parametrize("payload, name", [(42, "a int"), (PNG, "a bytes"), (np.zeros(4), "a float64 numpy array")],
                         ids=["int", "bytes", "float-array"])
def test_other_types_are_refused_by_name(payload, name):
    assert f"cannot read an image from {name}" in message(payload)


def test_paths_are_refused_by_default_and_read_when_allowed(tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(PNG)
    for payload in (str(path), path, path.as_uri()):
        assert "local files are not read by this server" in message(payload)
        assert load_image(payload, ImageLimits(allow_files=True)).size == (16, 12)
    assert "no such image file" in message(tmp_path / "dog.png", ImageLimits(allow_files=True))


@pytest.mark.parametrize("url", ["ftp://example.com/cat.png", "gopher://example.com/cat.png", "javascript:alert(1)"])
def test_other_schemes_are_refused_listing_the_accepted_forms(url):
    text = message(url)
    assert f"the {url.split(':')[0]}: scheme is not accepted" in text and "data:image/" in text and "http(s)://" in text


# http(s), against a server on 127.0.0.1

STOP = threading.Event()  # set at teardown, so handlers that sleep return at once


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # for the chunked response

    def log_message(self, *args):
        pass

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading, as it should
            pass

    def do_GET(self):
        path = self.path
        if path.startswith("/hops/"):  # /hops/N: N redirects, then the PNG
            n = int(path.rsplit("/", 1)[1])
            return self.redirect(f"/hops/{n - 1}") if n else self.send(200, PNG)
        if path == "/png":
            return self.send(200, PNG)
        if path == "/slow":
            STOP.wait(5)
            return self.send(200, PNG)
        if path == "/trickle":  # headers at once, then a byte every 0.1 s: no single read times out
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            for byte in PNG:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                if STOP.wait(0.1):
                    return
        if path == "/big":
            return self.send(200, b"\0" * 50_000)
        if path == "/big-chunked":  # no Content-Length: only counting the bytes read can stop it
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(50):
                self.wfile.write(b"3e8\r\n" + b"\0" * 1000 + b"\r\n")
            return self.wfile.write(b"0\r\n\r\n")
        redirects = {"/redirect": "/png", "/to-file": "file:///etc/passwd", "/loop": "/loop"}
        if path in redirects:
            return self.redirect(redirects[path])
        self.send(404, b"not found")

    def send(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def server():
    STOP.clear()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    STOP.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture
def base(server, monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)  # 127.0.0.1 must be reached directly
    return server


def test_http_png_is_fetched(base):
    image = load_image({"url": f"{base}/png", "detail": "low"})
    assert np.array_equal(np.asarray(image), np.asarray(noise()))


def test_http_error_status_names_status_and_url(base):
    text = message(f"{base}/missing")
    assert "HTTP 404" in text and "/missing" in text


def test_http_slow_server_times_out(base):
    start = time.monotonic()
    text = message(f"{base}/slow", ImageLimits(timeout=0.5))
    assert "could not be fetched: timed out after 0.5 s" in text and "/slow" in text
    assert time.monotonic() - start < 2


def test_http_trickling_body_times_out_as_a_whole(base):
    start = time.monotonic()
    assert "timed out after 0.5 s" in message(f"{base}/trickle", ImageLimits(timeout=0.5))
    assert time.monotonic() - start < 2


def test_http_oversize_body_refused_from_content_length(base):
    text = message(f"{base}/big", ImageLimits(max_bytes=4000))
    assert "over the limit of 4,000 bytes" in text and "it says 50,000 bytes" in text


def test_http_oversize_chunked_body_refused_while_reading(base):
    text = message(f"{base}/big-chunked", ImageLimits(max_bytes=4000))
    assert "over the limit of 4,000 bytes" in text and "stopped reading at" in text


def test_http_redirect_to_http_is_followed(base):
    assert load_image(f"{base}/redirect").size == (16, 12)
    assert load_image(f"{base}/hops/5").size == (16, 12)  # five redirects: the most followed


def test_http_redirect_to_file_is_refused(base):
    text = message(f"{base}/to-file", ImageLimits(allow_files=True))  # even where local files are allowed
    assert "redirects to a file: URL, which is not followed" in text


@pytest.mark.parametrize("path", ["/loop", "/hops/6"])
def test_http_redirect_loop_is_refused(base, path):
    assert "more than 5 redirects" in message(f"{base}{path}")


def test_http_connection_refused_says_could_not_be_fetched(base):
    import socket
    with socket.socket() as s:  # a port just freed, so nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = message(f"http://127.0.0.1:{port}/cat.png")
    assert f"127.0.0.1:{port}/cat.png" in text and "could not be fetched" in text


def test_http_refused_when_not_allowed(base):
    text = message(f"{base}/png", ImageLimits(allow_http=False))
    assert "URLs are not fetched by this server" in text and "data:image/" in text


def test_image_error_is_a_plinth_error():
    assert issubclass(ImageError, PlinthError)  # so the server answers it with a 400
