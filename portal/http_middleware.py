"""HTTP framing the WSGI server leaves to the application.

gunicorn writes whatever body the application returns, also for HEAD: a HEAD answered
with an HTML 404 page put that page on the wire, where a keep-alive client reads it as
the start of the next response. And Django's CommonMiddleware gives a 304 (or 204) a
`Content-Length: 0`, which for a 304 claims the representation is empty.
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse
from django.middleware import common

# RFC 9110 6.4.1: these never carry content; a Content-Length on them says something false.
NO_CONTENT_STATUSES = frozenset({204, 304})


class BodylessResponseMiddleware:
    """No body on a HEAD response, a 204 or a 304; no Content-Length on a 204 or a 304.

    A HEAD keeps the Content-Length its GET would have, as RFC 9110 9.3.2 expects. Put it
    above CommonMiddleware (which sets that length) so that it sees the final response.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if response.status_code in NO_CONTENT_STATUSES:
            _drop_body(response)
            del response["Content-Length"]
        elif request.method == "HEAD":
            if not response.streaming and not response.has_header("Content-Length"):
                response["Content-Length"] = str(len(response.content))
            _drop_body(response)
        return response


def _drop_body(response: HttpResponse) -> None:
    if response.streaming:
        # The original iterator or file stays registered to be closed with the response.
        response.streaming_content = iter(())
    else:
        response.content = b""


class CommonMiddleware(common.CommonMiddleware):
    """Django's, without the trailing-slash redirect where it would lose a request body.

    A redirect drops the body of a POST (and in DEBUG Django raises instead, a 500), so
    an unsafe method is answered by the view's own 404. Under /api/ nothing redirects:
    the API's catch-all answers with a JSON 404 that names the URL with the slash.
    """

    def should_redirect_with_slash(self, request: HttpRequest) -> bool:
        if request.method not in ("GET", "HEAD") or request.path_info.startswith("/api/"):
            return False
        return super().should_redirect_with_slash(request)
