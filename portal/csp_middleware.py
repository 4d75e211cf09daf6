"""django-csp's middleware, minus its work on responses that carry their own policy.

The site policy is built per response (it holds the request's nonce). A weight file is
never rendered as a page, so its response sets a fixed `default-src 'none'; sandbox`
itself, and building the site policy for each of thousands of range requests a second
would be spent for nothing.
"""

from __future__ import annotations

from csp.constants import HEADER
from csp.middleware import CSPMiddleware as SiteCSPMiddleware
from django.http import HttpRequest, HttpResponseBase

FILE_POLICY = "default-src 'none'; sandbox"


class CSPMiddleware(SiteCSPMiddleware):
    def process_response(
        self, request: HttpRequest, response: HttpResponseBase
    ) -> HttpResponseBase:
        if HEADER in response:
            return response
        return super().process_response(request, response)
