"""Receiving an upload (POST attachments/): multipart, one file in the field `file`, streamed to a
temporary file on disk while its size is counted, never held whole in memory.

The body as a whole is capped before it is read (core.bodylimit, CHAT_REQUEST_BODY_CAPS: the
largest attachment plus its envelope); the handler below applies the exact limit to the file
itself, and the uploader's remaining quota, as the bytes arrive: the first byte over either ends
the upload with a JSON 413 and leaves nothing behind. The name the client gave is refused (not
silently rewritten, as Django would) when it has path separators or control characters.
"""
from __future__ import annotations

import tempfile
from typing import IO

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler, SkipFile
from django.http.multipartparser import MultiPartParser as DjangoMultiPartParser
from django.http.multipartparser import MultiPartParserError
from rest_framework.exceptions import ParseError
from rest_framework.parsers import DataAndFiles, MultiPartParser

from chat.attachment_files import check_attachment_name
from chat.services.attachments import file_too_large, quota_exceeded

UPLOAD_FIELD = "file"


class ReceivedFile(UploadedFile):
    """The upload as received: a temporary file (deleted when closed), the client's name."""

    def __init__(self, file: IO[bytes], name: str, size: int) -> None:
        super().__init__(file=file, name=name, content_type=None, size=size)

    def temporary_file_path(self) -> None:  # an anonymous temporary file has no path
        return None


class AttachmentUploadHandler(FileUploadHandler):
    """Write the one `file` field to a temporary file, refusing it past the limit or the quota.
    `remaining_quota` is asked once the file starts, when the request's user is known."""

    def __init__(self, request=None, *, remaining_quota) -> None:
        super().__init__(request)
        self.remaining_quota = remaining_quota
        self.received: ReceivedFile | None = None
        # Not `self.file`: Django's parser closes every handler's `file` when it skips a part.
        self.spool: IO[bytes] | None = None

    def new_file(self, field_name, file_name, *args, **kwargs) -> None:
        super().new_file(field_name, file_name, *args, **kwargs)
        if field_name != UPLOAD_FIELD or self.spool is not None:
            raise SkipFile()  # only one file, in its own field: anything else is ignored
        self.limit = settings.CHAT_MAX_ATTACHMENT_BYTES
        self.quota_left = self.remaining_quota()
        self.spool = tempfile.TemporaryFile()
        self.size = 0

    def receive_data_chunk(self, raw_data: bytes, start: int) -> None:
        self.size += len(raw_data)
        if self.size > self.limit:
            self._discard()
            raise file_too_large()
        if self.size > self.quota_left:
            self._discard()
            raise quota_exceeded(self.quota_left)
        self.spool.write(raw_data)
        return None

    def file_complete(self, file_size: int) -> ReceivedFile | None:
        if self.spool is None or self.received is not None:
            return None
        self.spool.seek(0)
        self.received = ReceivedFile(self.spool, self.file_name, self.size)
        return self.received

    def _discard(self) -> None:
        if self.spool is not None:
            self.spool.close()


class _NameCheckingParser(DjangoMultiPartParser):
    def sanitize_file_name(self, file_name: str) -> str:
        return check_attachment_name(file_name)


class AttachmentMultiPartParser(MultiPartParser):
    """DRF's multipart parser with Django's name sanitizing replaced by a refusal."""

    def parse(self, stream, media_type=None, parser_context=None) -> DataAndFiles:
        parser_context = parser_context or {}
        request = parser_context["request"]
        encoding = parser_context.get("encoding", settings.DEFAULT_CHARSET)
        meta = request.META.copy()
        meta["CONTENT_TYPE"] = media_type
        try:
            data, files = _NameCheckingParser(meta, stream, request.upload_handlers, encoding).parse()
        except MultiPartParserError as exc:
            raise ParseError(f"Multipart form parse error - {exc}") from None
        return DataAndFiles(data, files)
