"""One image content part of a chat message -> a decoded Pillow image, safely: data: URIs, http(s)
URLs, local files (from Python only), PIL images and uint8 arrays, each within size and time limits,
every bad input ending as an ImageError (the server's 400) that names it and says how to fix it.

    image = load_image({"url": "data:image/png;base64,iVBORw0KGgo...", "detail": "auto"})
    image = load_image("cat.png", ImageLimits(allow_files=True))  # from Python: paths too
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import re
import threading
import time
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from plinth.errors import PlinthError

DETAILS = ("auto", "low", "high")  # OpenAI's detail values; accepted and ignored (the encoder's resolution is fixed)
MAX_REDIRECTS = 5
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what chat images are; not EPS (runs Ghostscript) nor rarer decoders
# catch_warnings swaps the process-wide filter list; the server decodes in worker threads, and two
# interleaved swaps could leave the "error" filter installed for good, so decodes take turns.
_BOMB_AS_ERROR = threading.Lock()
SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]+):")  # two letters at least, so "C:\cat.png" is a path


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 10 * 2**20  # largest encoded image (data: URI payload after base64 decoding, or HTTP body)
    max_pixels: int = 4096 * 4096  # largest width*height, checked from the header before pixels are decoded
    timeout: float = 10.0  # seconds for an http(s) fetch, connect + whole body
    allow_http: bool = True  # fetch http(s):// URLs at all
    allow_files: bool = False  # local paths / file:// — True from Python (plinth.load), False in the server


class ImageError(PlinthError):
    """A bad image input; the server answers it with HTTP 400."""


def load_image(payload, limits: ImageLimits = ImageLimits()):
    """-> a PIL.Image.Image (decoded: .load() called, unless the caller passed it in), or a uint8 numpy
    array passed through unchanged."""
    if isinstance(payload, dict):
        payload = _url_of(payload)
    if isinstance(payload, np.ndarray) and payload.dtype == np.uint8:
        return payload
    if isinstance(payload, Image.Image):  # opened by the caller, so its size is the caller's choice; decoded
        return payload                     # (and a truncated one named) where every image is fitted: ImagePrep
    if isinstance(payload, os.PathLike):
        return _from_file(Path(payload), limits)
    if not isinstance(payload, str):
        what = f"a {payload.dtype} numpy array" if isinstance(payload, np.ndarray) else f"a {type(payload).__name__}"
        raise ImageError(f"cannot read an image from {what}; send {_accepted(limits)}, a PIL image or uint8 pixels")
    scheme = m.group(1).lower() if (m := SCHEME.match(payload)) else ""
    if scheme == "data":
        return _decode(_data_uri(payload, limits), f"the data: URI {_short(payload)}", limits)
    if scheme in ("http", "https"):
        if not limits.allow_http:
            raise ImageError(f"{_short(payload)}: URLs are not fetched by this server; send the image inline as a "
                             f"data:image/...;base64,... URI")
        return _decode(_fetch(payload, limits), f"the image at {_short(payload)}", limits)
    if scheme == "file":
        payload = urllib.request.url2pathname(urllib.parse.urlsplit(payload).path)
    elif scheme:
        raise ImageError(f"{_short(payload)}: the {scheme}: scheme is not accepted; send {_accepted(limits)}")
    return _from_file(Path(payload).expanduser(), limits)


def _url_of(part: dict) -> str:
    """The url of OpenAI's image_url object {"url", "detail"}, its detail checked and ignored."""
    if part.get("detail", "auto") not in DETAILS:
        raise ImageError(f"image_url detail {part['detail']!r} is not one of {', '.join(DETAILS)}; use one of them "
                         f"or leave detail out")
    if not isinstance(part.get("url"), str):
        raise ImageError(f"an image_url object needs a string 'url' (a data:image/...;base64,... URI or an http(s) "
                         f"URL), not {type(part.get('url')).__name__}")
    return part["url"]


def _data_uri(uri: str, limits: ImageLimits) -> bytes:
    header, comma, data = uri[5:].partition(",")
    mime, *params = header.split(";")
    name = f"the data: URI {_short(uri)}"
    if not comma or not params or params[-1].lower() != "base64":
        raise ImageError(f"{name} is not a base64 data: URI; send data:<image type>;base64,<payload>")
    if not mime.lower().startswith("image/"):
        raise ImageError(f"{name} has type {mime or 'text/plain'!r}, which is not an image; send "
                         f"data:image/png;base64,... (or image/jpeg, image/webp, ...)")
    size = len(data) * 3 // 4 - data[-2:].count("=")  # known before decoding, so a huge payload costs no more
    if size > limits.max_bytes:
        raise ImageError(f"{name} holds {size:,} bytes, over the limit of {limits.max_bytes:,}; send a smaller image")
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error as e:
        raise ImageError(f"{name} is not valid base64 ({e}); encode the image's bytes as standard base64, "
                         f"with no line breaks") from e


def _fetch(url: str, limits: ImageLimits) -> bytes:
    """The body at url, following up to MAX_REDIRECTS http(s) redirects, all within limits.timeout."""
    deadline, first = time.monotonic() + limits.timeout, url
    try:
        with httpx.Client(follow_redirects=False) as client:  # redirects by hand, so each target's scheme is checked
            for _ in range(MAX_REDIRECTS + 1):
                with client.stream("GET", url, timeout=max(deadline - time.monotonic(), 0.001)) as response:
                    if not response.is_redirect:
                        return _body(response, url, limits, deadline)
                    target = response.url.join(response.headers["location"])
                if target.scheme not in ("http", "https"):  # file:, data:, ftp: would let a URL read elsewhere
                    raise ImageError(f"{_short(first)} redirects to a {target.scheme}: URL, which is not followed; "
                                     f"link to the image's http(s) URL")
                url = str(target)
        raise ImageError(f"{_short(first)}: more than {MAX_REDIRECTS} redirects; link to the image's final URL")
    except httpx.TimeoutException as e:
        raise ImageError(f"{_short(url)} could not be fetched: timed out after {limits.timeout:g} s; send the image "
                         f"as a data: URI or from a faster host") from e
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise ImageError(f"{_short(url)} could not be fetched ({e}); check the URL, or send a data: URI") from e


def _body(response: httpx.Response, url: str, limits: ImageLimits, deadline: float) -> bytes:
    if response.status_code >= 400:
        raise ImageError(f"{_short(url)} answered HTTP {response.status_code}; check that the URL is right and public")
    too_big = f"{_short(url)} is over the limit of {limits.max_bytes:,} bytes; send a smaller image"
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > limits.max_bytes:  # refused before reading any of it
        raise ImageError(f"{too_big} (it says {int(length):,} bytes)")
    body = bytearray()
    for chunk in response.iter_bytes():  # each read as it comes (a chunk_size would buffer); decompressed, so
        # a gzip bomb is cut off too
        body += chunk
        if len(body) > limits.max_bytes:  # Content-Length may be absent (chunked) or lie
            raise ImageError(f"{too_big} (stopped reading at {len(body):,} bytes)")
        if time.monotonic() > deadline:  # httpx's timeout is per read; a trickling body must stop too
            raise httpx.ReadTimeout("the whole-body deadline passed")
    return bytes(body)


def _from_file(path: Path, limits: ImageLimits) -> Image.Image:
    if not limits.allow_files:
        raise ImageError(f"{_short(str(path))}: local files are not read by this server; send {_accepted(limits)}")
    if not path.is_file():
        raise ImageError(f"no such image file: {path}; check the path")
    return _decode(path, str(path), limits)


def _decode(source: bytes | Path, name: str, limits: ImageLimits) -> Image.Image:
    try:
        with _BOMB_AS_ERROR, warnings.catch_warnings():  # Pillow's own bomb guard only warns below 2x its limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=FORMATS) as image:
                if image.width * image.height > limits.max_pixels:  # from the header, before pixels are decoded
                    raise ImageError(f"{name} is {image.width}x{image.height} = {image.width * image.height:,} pixels, "
                                     f"over the limit of {limits.max_pixels:,}; resize it smaller first")
                image.load()  # Pillow decodes lazily: a truncated image must fail here, by name
                return image  # leaving `with` closes a file we opened; the decoded pixels stay
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(f"{name} is too large to decode safely ({e}); resize it smaller first") from e
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise ImageError(f"{name} could not be decoded as an image: {e}; send a PNG, JPEG, WebP or GIF") from e


def _accepted(limits: ImageLimits) -> str:
    forms = ["a data:image/...;base64,... URI"] + ["an http(s):// URL"] * limits.allow_http
    return " or ".join(forms + ["a local path or file:// URL"] * limits.allow_files)


def _short(text: str) -> str:
    """The input as an error names it: its start, never a whole base64 payload."""
    return repr(text[:60] + ("..." if len(text) > 60 else ""))
