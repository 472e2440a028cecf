"""Files for the attachment tests, made here: images (with a location, truncated, a bomb), and a
raw multipart body (Django's test client strips path separators from a file name before sending,
and the service must see them to refuse them)."""
from __future__ import annotations

import io
import uuid

from PIL import Image

GPS_IFD = 0x8825


def jpeg(size: tuple[int, int] = (64, 48), *, location: bool = False, color: str = "red") -> bytes:
    image = Image.new("RGB", size, color)
    exif = Image.Exif()
    exif[0x010F] = "Test camera"  # Make: kept
    if location:
        exif[GPS_IFD] = {1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 36.0)}
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif.tobytes(), quality=90)
    return out.getvalue()


def png(size: tuple[int, int] = (40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", size, (0, 128, 255, 128)).save(out, "PNG")
    return out.getvalue()


def png_bomb() -> bytes:
    """A PNG of a few hundred bytes that declares 20000 x 20000 pixels (400 megapixels)."""
    out = io.BytesIO()
    Image.new("1", (20000, 20000)).save(out, "PNG", optimize=True)
    return out.getvalue()


def exif_of(data: bytes) -> Image.Exif:
    with Image.open(io.BytesIO(data)) as image:
        return image.getexif()


def multipart(name: str, data: bytes, *, field: str = "file") -> tuple[bytes, str]:
    """(body, content type) of a form with one file."""
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def upload(client, name: str, data: bytes, **kwargs):
    body, content_type = multipart(name, data, **kwargs)
    return client.generic("POST", "/api/v1/attachments/", body, content_type=content_type)
