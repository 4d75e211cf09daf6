"""The OpenAPI schema and the Swagger UI page, served from this origin.

Swagger UI's files come from drf-spectacular-sidecar (collected with the static files),
and its start-up script is a separate same-origin request (the split view), so the page
works offline and runs under the portal's Content-Security-Policy without inline code.
"""

from __future__ import annotations

from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from portal.api_errors import JSONErrorsMixin


class SchemaView(JSONErrorsMixin, SpectacularAPIView):
    pass


class DocsView(JSONErrorsMixin, SpectacularSwaggerSplitView):
    url_name = "api-schema"
