"""The attachment endpoints (docs/attachments.md): upload, download, thumbnail. Thin: the rules
live in chat.access (who may read), chat.services.attachments (what is stored) and chat.uploads
(how the bytes arrive)."""
from __future__ import annotations

import re

from django.conf import settings
from django.core.files.storage import FileSystemStorage
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, StreamingHttpResponse
from django.utils.http import content_disposition_header
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from chat.access import access_attachment
from chat.selectors import attachment_descriptor
from chat.attachment_files import INLINE_IMAGE_TYPES, THUMBNAIL_CONTENT_TYPE
from chat.serializers import AttachmentOutput
from chat.services.attachments import (
    attachment_create,
    attachment_quota_left,
    attachment_storage,
    check_upload_rate,
)
from chat.uploads import UPLOAD_FIELD, AttachmentMultiPartParser, AttachmentUploadHandler
from core.errors import NotFound, StoreUnavailable, ValidationFailed
from core.threads import in_thread

DOWNLOAD_CHUNK_BYTES = 256 * 1024
# A downloaded file is never a page of ours: no scripts, no plugins, no same-origin access,
# whatever it contains (an SVG or HTML upload opened in a browser tab stays inert).
DOWNLOAD_CSP = "default-src 'none'; sandbox"


class AttachmentUploadInput(serializers.Serializer):
    file = serializers.FileField(help_text="The file; its name is kept (no path separators or control characters).")


_ERROR = OpenApiResponse(description="`{detail, code}`")


class AttachmentUploadView(APIView):
    parser_classes = [AttachmentMultiPartParser]

    def initialize_request(self, request: HttpRequest, *args, **kwargs):
        # Before anything reads the body (a session's CSRF check may): the upload's own handler,
        # which streams the file to disk and stops at the limit or the quota.
        request.upload_handlers = [
            AttachmentUploadHandler(request, remaining_quota=lambda: attachment_quota_left(user=request.user))
        ]
        return super().initialize_request(request, *args, **kwargs)

    @extend_schema(
        request={"multipart/form-data": AttachmentUploadInput},
        responses={
            201: AttachmentOutput,
            413: OpenApiResponse(description="Over CHAT_MAX_ATTACHMENT_BYTES (`request_too_large`) or over "
                                 "the uploader's CHAT_ATTACHMENT_QUOTA_BYTES (`quota_exceeded`)."),
        },
    )
    def post(self, request):
        """Upload a file (multipart, field `file`). It stays yours alone until a message you send
        carries it (`attachments: [attachment_id]`); unsent, it is deleted after 24 hours. The
        content type is sniffed from the bytes; images get width, height and a thumbnail, and lose
        their EXIF location."""
        check_upload_rate(user=request.user)
        upload = request.FILES.get(UPLOAD_FIELD)
        if upload is None:
            raise ValidationFailed({UPLOAD_FIELD: ["Send the file as multipart/form-data in the field 'file'."]})
        try:
            attachment = attachment_create(uploader=request.user, file=upload.file, name=upload.name, size=upload.size)
        finally:
            upload.close()
        return Response(attachment_descriptor(attachment), status=status.HTTP_201_CREATED)


class AttachmentDownloadView(APIView):
    @extend_schema(
        responses={
            (200, "*/*"): OpenApiTypes.BINARY,
            (206, "*/*"): OpenApiTypes.BINARY,
            302: OpenApiResponse(description="Object storage: a signed URL that expires within a minute."),
            403: _ERROR,
            416: OpenApiResponse(description="A Range outside the file."),
        },
        operation_id="v1_attachments_download",
    )
    def get(self, request, attachment_id):
        """The file: for its uploader while unsent, then for the participants of the conversation
        its message is in (403 for anyone else and for unknown ids). Images show inline; every
        other type downloads as a file. Range requests are answered (video seeking)."""
        attachment = access_attachment(user=request.user, attachment_id=attachment_id)
        inline = attachment.content_type in INLINE_IMAGE_TYPES
        return serve_attachment_object(request, attachment.object_name, attachment.content_type, attachment.name, inline=inline)


class AttachmentThumbnailView(APIView):
    @extend_schema(
        responses={(200, THUMBNAIL_CONTENT_TYPE): OpenApiTypes.BINARY, 302: OpenApiResponse(), 403: _ERROR,
                   404: _ERROR},
        operation_id="v1_attachments_thumbnail",
    )
    def get(self, request, attachment_id):
        """An image attachment's thumbnail (WebP, at most 320x320); same access as the file."""
        attachment = access_attachment(user=request.user, attachment_id=attachment_id)
        if not attachment.has_thumbnail:
            raise NotFound("This attachment has no thumbnail.")
        name = f"{attachment.name.rsplit('.', 1)[0]}-thumbnail.webp"
        return serve_attachment_object(request, attachment.thumbnail_object_name, THUMBNAIL_CONTENT_TYPE, name, inline=True)


def serve_attachment_object(request, object_name: str, content_type: str, filename: str, *, inline: bool) -> HttpResponse:
    disposition = content_disposition_header(as_attachment=not inline, filename=filename)
    storage = attachment_storage()
    if isinstance(storage, FileSystemStorage):
        response = _stream_local(request, storage, object_name, content_type)
    else:
        # Object storage serves the bytes (and Range) itself, under the same headers.
        response = HttpResponseRedirect(
            storage.url(
                object_name,
                parameters={"ResponseContentType": content_type, "ResponseContentDisposition": disposition},
                expire=settings.CHAT_ATTACHMENT_URL_SECONDS,
            )
        )
    response["Content-Disposition"] = disposition
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = DOWNLOAD_CSP
    response["Cache-Control"] = "private, no-cache"
    return response


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) bytes a Range header asks for; None for the whole file (no
    header, several ranges, or a unit we do not serve); ValueError when it lies outside the file."""
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None or match.group(0) == "bytes=-":
        return None
    first, last = match.groups()
    if first == "":  # the last N bytes
        length = int(last)
        if length == 0:
            raise ValueError(header)
        return max(size - length, 0), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise ValueError(header)
    return start, end


def _stream_local(request, storage: FileSystemStorage, object_name: str, content_type: str) -> HttpResponse:
    try:
        size = storage.size(object_name)
    except OSError as exc:
        raise StoreUnavailable("The file storage is unavailable. Retry later.") from exc
    try:
        wanted = byte_range(request.headers.get("Range"), size)
    except ValueError:
        response = HttpResponse(status=416)
        response["Content-Range"] = f"bytes */{size}"
        return response
    first, last = wanted if wanted is not None else (0, size - 1)
    response = StreamingHttpResponse(
        _chunks(storage, object_name, first, last - first + 1),
        content_type=content_type,
        status=206 if wanted is not None else 200,
    )
    response["Content-Length"] = str(last - first + 1)
    response["Accept-Ranges"] = "bytes"
    if wanted is not None:
        response["Content-Range"] = f"bytes {first}-{last}/{size}"
    return response


async def _chunks(storage: FileSystemStorage, object_name: str, offset: int, length: int):
    """The file's bytes from `offset`, a chunk at a time, read off the event loop (an async
    iterator: Django would read a sync one whole into memory before sending it under ASGI)."""
    file = await in_thread(storage.open)(object_name, "rb")
    try:
        await in_thread(file.seek)(offset)
        while length > 0:
            chunk = await in_thread(file.read)(min(DOWNLOAD_CHUNK_BYTES, length))
            if not chunk:
                break
            length -= len(chunk)
            yield chunk
    finally:
        file.close()
