from django.contrib import admin
from django.urls import include, path, re_path

from portal import api_docs, api_errors, health, views

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("admin/", admin.site.urls),
    path("accounts/", include("allauth.urls")),
    path("", include("access.urls")),
    path("", include("weights.urls")),
    path("", include("inference_demo.urls")),
    # The Hugging Face Hub protocol, before the portal's own API and its JSON 404.
    path("", include("weights.hub_urls")),
    # The OpenAI API (inference_demo.openai_api): OpenAI's paths and errors, not the envelope.
    path("api/v1/", include("inference_demo.openai_api_urls")),
    path("api/", include("access.api_urls")),
    path("api/schema/", api_docs.SchemaView.as_view(), name="api-schema"),
    path("api/docs/", api_docs.DocsView.as_view(), name="api-docs"),
    # Last: anything else under /api/ is a JSON 404, never an HTML page or a slash redirect.
    re_path(
        r"^api(?:/[\s\S]*)?\Z",
        api_errors.endpoint_not_found,
        name=api_errors.NOT_FOUND_URL_NAME,
    ),
]

handler500 = "portal.errors.server_error"
