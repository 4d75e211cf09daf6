"""Form bodies must be UTF-8, on every page and in both form encodings.

Django decodes form data leniently: an urlencoded body's stray bytes become Latin-1
or U+FFFD, a multipart field's become U+FFFD, and a declared charset other than UTF-8
is believed. Any of these would store mojibake, so the middleware answers 400 before a
view, allauth or the CSRF check reads the form.

The check reads request.body, which refuses bodies over DATA_UPLOAD_MAX_MEMORY_SIZE (a
400) before reading anything; the portal takes no file uploads, so a multipart form is
held to the same limit as any other form. Django parses request.POST from that copy
afterwards, exactly as it would have.
"""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO
from urllib.parse import parse_qsl

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.files.uploadhandler import FileUploadHandler
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.http.multipartparser import MultiPartParser, MultiPartParserError

from portal.api_errors import BODY_TOO_LARGE, error_response

NOT_UTF8 = "The form was not sent as UTF-8; reload the page and try again."
MALFORMED_MULTIPART = "The form could not be read ({error}); reload the page and try again."

URLENCODED = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
_BODILESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_UTF8_NAMES = frozenset({"utf-8", "utf8"})
# Latin-1 maps every byte to one character and back, so a field decoded with it still
# holds the bytes that were sent; they are then decoded again, strictly, as UTF-8.
_LOSSLESS = "latin-1"


class _DiscardFiles(FileUploadHandler):
    """File parts are not form text: skip their bytes instead of spooling them."""

    def receive_data_chunk(self, raw_data: bytes, start: int) -> None:
        return None

    def file_complete(self, file_size: int) -> None:
        return None


def _urlencoded_is_utf8(body: bytes) -> bool:
    try:
        parse_qsl(body.decode("utf-8"), keep_blank_values=True, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        return False
    return True


def _part_headers_are_utf8(boundary: str, body: bytes) -> bool:
    # Django's parser skips a part header it cannot decode, so a field whose name is not
    # UTF-8 would silently vanish; look at the headers before it does.
    if not boundary:
        return True  # the parser refuses the body itself
    for part in body.split(b"--" + boundary.encode("ascii", "replace"))[1:]:
        if part.startswith(b"--"):  # the closing delimiter; what follows is ignored
            break
        headers = part.partition(b"\r\n\r\n")[0]
        try:
            headers.decode("utf-8")
        except UnicodeDecodeError:
            return False
    return True


def _multipart_is_utf8(request: HttpRequest, body: bytes) -> bool:
    if not _part_headers_are_utf8(request.content_params.get("boundary", ""), body):
        return False
    parser = MultiPartParser(request.META, BytesIO(body), [_DiscardFiles(request)], _LOSSLESS)
    fields, _files = parser.parse()
    try:
        for name, values in fields.lists():
            for text in (name, *values):
                text.encode(_LOSSLESS).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def form_is_utf8(request: HttpRequest) -> bool:
    """Whether a form body (urlencoded or multipart) is UTF-8; True for anything else."""
    if request.method in _BODILESS_METHODS or request.content_type not in (URLENCODED, MULTIPART):
        return True
    charset = request.content_params.get("charset")
    if charset is not None and charset.strip().lower() not in _UTF8_NAMES:
        return False
    if request.content_type == URLENCODED:
        return _urlencoded_is_utf8(request.body)
    return _multipart_is_utf8(request, request.body)


class Utf8FormMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        try:
            utf8 = form_is_utf8(request)
        except MultiPartParserError as exc:
            return _bad_request(request, MALFORMED_MULTIPART.format(error=exc), "malformed_form")
        except RequestDataTooBig:
            if not _is_api(request):
                raise  # Django's own 400 page
            limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
            return error_response(BODY_TOO_LARGE.format(limit=limit), "body_too_large", 413)
        if not utf8:
            return _bad_request(request, NOT_UTF8, "not_utf8")
        return self.get_response(request)


def _is_api(request: HttpRequest) -> bool:
    return request.path_info.startswith("/api/")


def _bad_request(request: HttpRequest, message: str, code: str) -> HttpResponse:
    if _is_api(request):  # the API's one error shape
        return error_response(message, code, 400)
    return HttpResponseBadRequest(message, content_type="text/plain; charset=utf-8")
