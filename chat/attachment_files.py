"""What an uploaded file is, decided from its bytes (docs/attachments.md): its name checked, its
content type sniffed (puremagic; the client's Content-Type is never read), a name that claims
another type refused, and images opened with Pillow within its limits: dimensions, a thumbnail,
the EXIF location removed. Pure file logic, no database and no storage: chat.services.attachments
decides what to keep.
"""
from __future__ import annotations

import hashlib
import io
import mimetypes
import os
import tempfile
import unicodedata
import warnings
from dataclasses import dataclass
from typing import IO

import puremagic
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import ValidationFailed

MAX_NAME_LENGTH = 255
# Bytes read to sniff a type: every signature puremagic knows sits in the first few KiB.
SNIFF_BYTES = 64 * 1024
# Images the service measures, thumbnails and serves inline; any other type downloads as a file.
INLINE_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
PILLOW_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}
# Decompression bombs: an image is refused above this many pixels before it is decoded (a small
# file can declare a huge canvas; decoding 50 megapixels holds about 200 MB for a moment).
MAX_IMAGE_PIXELS = 50_000_000
THUMBNAIL_SIZE = (320, 320)
THUMBNAIL_CONTENT_TYPE = "image/webp"
TEXT_TYPE = "text/plain"
UNKNOWN_TYPE = "application/octet-stream"
# Claimed types that can be verified from bytes: a name claiming one of these must match them.
_VERIFIABLE_PREFIXES = ("image/", "video/", "audio/")
_VERIFIABLE_TYPES = frozenset({"application/pdf", "application/zip", "application/x-msdownload"})
# Names for the same format: a name's type (Python's mimetypes) and the sniffed one (puremagic)
# may use either.
_SAME_FORMAT = {
    "image/heif": "image/heic", "image/heic-sequence": "image/heic", "image/heif-sequence": "image/heic",
    "image/x-ms-bmp": "image/bmp", "audio/wave": "audio/wav", "audio/x-wav": "audio/wav",
    "application/x-gzip": "application/gzip", "audio/x-m4a": "audio/mp4", "audio/mp4a-latm": "audio/mp4",
    "application/x-zip-compressed": "application/zip", "image/x-icon": "image/vnd.microsoft.icon",
}
# The EXIF tags that say where a photo was taken.
_GPS_IFD = 0x8825
# EXIF orientations that show the image turned by a quarter: its width and height swap on screen.
_ORIENTATION = 0x0112
_QUARTER_TURNS = frozenset({5, 6, 7, 8})


def check_attachment_name(name: object) -> str:
    """The file's name as people will see it, or ValidationFailed: 1-255 characters, no path
    separators, no control or format characters (a right-to-left override can disguise
    `gpj.exe` as `exe.jpg`), not `.` or `..`."""
    if not isinstance(name, str) or not name.strip():
        raise ValidationFailed({"file": ["The file must have a name."]})
    name = unicodedata.normalize("NFC", name)
    if len(name) > MAX_NAME_LENGTH:
        raise ValidationFailed({"file": [f"The file name must be at most {MAX_NAME_LENGTH} characters."]})
    if "/" in name or "\\" in name or name in {".", ".."}:
        raise ValidationFailed({"file": ["The file name must not contain path separators."]})
    if any(unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Zl", "Zp"} for ch in name):
        raise ValidationFailed({"file": ["The file name must not contain control characters."]})
    return name


def sniff_content_type(head: bytes, name: str) -> str:
    """The content type of a file whose first bytes are `head`, refusing a name whose extension
    claims a type the bytes are not (ValidationFailed)."""
    extension = os.path.splitext(name)[1].lower()
    claimed = mimetypes.guess_type(name, strict=False)[0] if extension else None
    try:
        matches = [m for m in puremagic.magic_string(head, filename=name) if m.mime_type]
    except (puremagic.PureError, ValueError):
        matches = []
    if matches:
        agreeing = [m for m in matches if m.extension.lower() == extension or _same_format(m.mime_type, claimed)]
        if agreeing:
            return agreeing[0].mime_type
        sniffed = matches[0].mime_type
        if claimed is not None:
            raise _lying_name(claimed, sniffed)
        return sniffed
    sniffed = TEXT_TYPE if _is_text(head) else UNKNOWN_TYPE
    if claimed is not None and (claimed.startswith(_VERIFIABLE_PREFIXES) or claimed in _VERIFIABLE_TYPES):
        raise _lying_name(claimed, sniffed)
    return sniffed


def _same_format(sniffed: str, claimed: str | None) -> bool:
    return claimed is not None and _SAME_FORMAT.get(sniffed, sniffed) == _SAME_FORMAT.get(claimed, claimed)


def _lying_name(claimed: str, sniffed: str) -> ValidationFailed:
    return ValidationFailed(
        {"file": [f"The file name says {claimed}, but its content is {sniffed}; rename it or send the right file."]}
    )


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # The head may end inside a multi-byte character.
        return exc.start >= len(head) - 3 and len(head) == SNIFF_BYTES
    return True


@dataclass(frozen=True, slots=True)
class ImageFacts:
    width: int
    height: int
    thumbnail: bytes
    # The image again without its location, when it had one (a temporary file); else None.
    cleaned: IO[bytes] | None


def inspect_image(file: IO[bytes], content_type: str) -> ImageFacts:
    """Measure an image, check it decodes whole within the pixel limit, make its thumbnail, and
    rewrite it without its EXIF location if it has one. ValidationFailed for anything Pillow
    cannot read (a truncated or corrupt file, a format that is not what the bytes claimed, a
    decompression bomb)."""
    file.seek(0)
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns at 89 megapixels; ours refuses earlier, before decoding.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                if PILLOW_FORMATS.get(image.format) != content_type:
                    raise ValidationFailed({"file": ["The image's content does not match its type."]})
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ValidationFailed(
                        {"file": [f"Images may have at most {MAX_IMAGE_PIXELS} pixels ({width}x{height} given)."]}
                    )
                exif = image.getexif()
                has_location = _GPS_IFD in exif
                if not has_location and image.format == "JPEG":
                    # Decode at a fraction of the size: enough for the thumbnail, and the whole
                    # file is still read (truncation still fails). A location needs the full image.
                    image.draft("RGB", (THUMBNAIL_SIZE[0] * 2, THUMBNAIL_SIZE[1] * 2))
                image.load()  # decodes every byte of the first frame: a truncated file fails here
                thumbnail = _thumbnail(image)
                cleaned = _without_location(image, exif) if has_location else None
    except ValidationFailed:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValidationFailed({"file": [f"Images may have at most {MAX_IMAGE_PIXELS} pixels."]}) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ValidationFailed({"file": [f"The image could not be read: {_reason(exc)}."]}) from None
    if exif.get(_ORIENTATION) in _QUARTER_TURNS:
        width, height = height, width  # as it is shown, like its thumbnail
    return ImageFacts(width=width, height=height, thumbnail=thumbnail, cleaned=cleaned)


def _reason(exc: Exception) -> str:
    text = str(exc).split("\n")[0][:200]
    return text or type(exc).__name__


def _thumbnail(image: Image.Image) -> bytes:
    small = ImageOps.exif_transpose(image.copy())
    small.thumbnail(THUMBNAIL_SIZE)
    if small.mode not in ("RGB", "RGBA"):
        small = small.convert("RGBA" if "transparency" in small.info or small.mode in ("LA", "PA") else "RGB")
    out = io.BytesIO()
    small.save(out, "WEBP", quality=80)
    return out.getvalue()


def _without_location(image: Image.Image, exif: Image.Exif) -> IO[bytes]:
    """The image re-saved with the same EXIF less its GPS block (and without XMP, which can carry
    the location too); JPEG keeps its quantization tables, so the pixels barely change."""
    del exif[_GPS_IFD]
    out = tempfile.TemporaryFile()
    options: dict = {"exif": exif.tobytes()}
    if image.format == "JPEG":
        options.update(quality="keep", subsampling="keep")
        if "icc_profile" in image.info:
            options["icc_profile"] = image.info["icc_profile"]
    elif image.format == "WEBP":
        options.update(lossless=image.info.get("lossless", False), quality=95)
    if getattr(image, "n_frames", 1) > 1:
        options["save_all"] = True
    image.save(out, image.format, **options)
    out.seek(0)
    return out


def sha256_and_size(file: IO[bytes]) -> tuple[str, int]:
    """Of a whole file, read in chunks."""
    file.seek(0)
    digest = hashlib.sha256()
    size = 0
    while chunk := file.read(1024 * 1024):
        digest.update(chunk)
        size += len(chunk)
    file.seek(0)
    return digest.hexdigest(), size
