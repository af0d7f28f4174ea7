"""A request's `image_url` to a decoded image, within the server's limits.

* `data:image/...;base64,...`: the image travels in the request (what clients should send).
* `file:///path`: only with `--allowed-local-media-path DIR`, and only for a file whose real path
  (`..` and symlinks resolved) lies inside DIR; a link pointing out of DIR is refused like a
  path outside it.
* `http(s)://`: refused. The server fetches nothing: a fetch would let any client make it
  connect anywhere its network reaches, and stall a worker on a slow host.

Sizes are checked before any decoding: the encoded bytes against `max_bytes` (413), then the
pixel count read from the image header against `max_pixels` and Pillow's decompression-bomb
limit (413), and only then are the pixels decoded.

    >>> load_image_url("data:image/png;base64,iVBORw0...", None, 16 << 20, 40_000_000)  # doctest: +SKIP
    <PIL.PngImagePlugin.PngImageFile image mode=RGB size=224x224>
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from pgexport.serve.protocol import ApiError

PARAM = "messages[0].content"


def too_large(what: str, limit: str) -> ApiError:
    return ApiError(413, f"the image's {what} is over this server's limit of {limit}; send a smaller image "
                    "(PaliGemma sees it at 224-896 pixels anyway)", PARAM, "image_too_large")


def data_url_bytes(url: str, max_bytes: int) -> bytes:
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise ApiError(400, "the data: URL must be base64, as data:image/png;base64,<data>", PARAM, "invalid_image_url")
    if len(payload) * 3 // 4 > max_bytes + 2:  # the decoded size, known before decoding
        raise too_large(f"size (about {len(payload) * 3 // 4} bytes)", f"{max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the data: URL's payload is not valid base64", PARAM, "invalid_image_url") from None
    if len(data) > max_bytes:
        raise too_large(f"size ({len(data)} bytes)", f"{max_bytes} bytes")
    return data


def local_file_bytes(url: str, allowed: Path | None, max_bytes: int) -> bytes:
    if allowed is None:
        raise ApiError(403, "file:// image URLs are off on this server (start it with --allowed-local-media-path "
                       "DIR to read images under DIR), or send the image as a data: URL", PARAM, "file_url_not_allowed")
    parsed = urlparse(url)
    path = Path(unquote(parsed.path))
    if parsed.netloc not in ("", "localhost") or not path.is_absolute():
        raise ApiError(400, "a file URL names an absolute local path: file:///path/to/image.png", PARAM,
                       "invalid_image_url")
    root = allowed.resolve()
    target = path.resolve()  # `..` and every symlink on the way, followed
    if not target.is_relative_to(root):
        raise ApiError(403, f"{path} is outside the folder this server reads images from "
                       "(--allowed-local-media-path); move the image there or send it as a data: URL", PARAM,
                       "file_url_not_allowed")
    if not target.is_file():
        raise ApiError(400, f"image file not found: {path}; check the path", PARAM, "image_not_found")
    size = target.stat().st_size
    if size > max_bytes:
        raise too_large(f"file size ({size} bytes)", f"{max_bytes} bytes")
    with open(target, "rb") as f:  # the resolved path, not the one given: no link is followed twice
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise too_large("file size", f"{max_bytes} bytes")
    return data


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Pixels from encoded bytes; the pixel count is checked on the header, before decoding."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise too_large(f"size ({image.width}x{image.height} pixels)", f"{max_pixels} pixels")
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_large("pixel count", f"Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels") from None
    except Image.UnidentifiedImageError:
        raise ApiError(400, "the image is not one Pillow can read; send a PNG, JPEG, WebP, ... image", PARAM,
                       "invalid_image") from None
    except (OSError, SyntaxError, ValueError) as e:  # how Pillow reports a truncated or corrupt file
        raise ApiError(400, f"the image is truncated or corrupt ({' '.join(str(e).split())[:120]}); re-encode it",
                       PARAM, "invalid_image") from None
    return image


def load_image_url(url: str, allowed: Path | None, max_bytes: int, max_pixels: int) -> Image.Image:
    """The image a request's `image_url` names, decoded (see the module docstring); raises
    `ApiError` 400 / 403 / 413."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = data_url_bytes(url, max_bytes)
    elif scheme == "file":
        data = local_file_bytes(url, allowed, max_bytes)
    elif scheme in ("http", "https"):
        raise ApiError(400, "this server fetches no remote URL; send the image in the request as a data: URL "
                       "(data:image/png;base64,...)", PARAM, "remote_url_not_allowed")
    else:
        raise ApiError(400, "image_url must be a data: URL (data:image/png;base64,...)", PARAM, "invalid_image_url")
    return decode_image(data, max_pixels)
