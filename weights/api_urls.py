"""Catalogue, grant and download-link endpoints, in the `api` namespace (access.api_urls)."""

from django.urls import path

from weights import api

urlpatterns = [
    path("releases/", api.ReleaseList.as_view(), name="release-list"),
    path("releases/<slug:slug>/", api.ReleaseDetail.as_view(), name="release-detail"),
    path("grants/", api.GrantList.as_view(), name="grant-list"),
    path("grants/<int:pk>/", api.GrantDetail.as_view(), name="grant-detail"),
    path("grants/<int:pk>/links/", api.GrantLinkCreate.as_view(), name="grant-links"),
]
