"""REST API of the catalogue (anonymous) and of a researcher's grants and download links.

Thin views: reads in weights.selectors and weights.grant_states, the fresh-link rule
(allowance shared with the My downloads page) in weights.services.fresh_links.
"""

from __future__ import annotations

from django.http import HttpRequest
from django.urls import reverse
from drf_spectacular.utils import extend_schema
from rest_framework import permissions, status
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from access.api import JsonAPIView
from access.models import Grant
from portal.api_errors import RETRY_AFTER, error_responses
from weights import selectors
from weights import serializers as s
from weights.grant_states import grant_state_for, grant_states_for
from weights.manifests import manifest_body
from weights.models import Release
from weights.services.fresh_links import NO_SUCH_GRANT, fresh_link_issue
from weights.services.links import IssuedLink

RELEASES, GRANTS = ["releases"], ["grants"]
NO_SUCH_RELEASE = "No release has the slug {slug}. The releases are listed at /api/releases/."
NOT_YOURS_404 = {404: "No grant of yours has this id."}
BAD_TOKEN_401 = {401: "Only when a token is sent and it does not work; no token is needed."}


# --- catalogue -------------------------------------------------------------------------


class ReleaseList(JsonAPIView):
    permission_classes = [permissions.AllowAny]

    @extend_schema(
        operation_id="releases_list",
        tags=RELEASES,
        summary="List the releases",
        description="The catalogue, in its display order: each release's size, number of "
        "files, parameter count and license. Anonymous: no token needed.",
        responses={
            200: s.ReleaseListSerializer(many=True),
            **error_responses(401, notes=BAD_TOKEN_401),
        },
    )
    def get(self, request: Request) -> Response:
        # An aggregate drops Meta.ordering (Django >= 3.1): ask for the display order.
        releases = selectors.catalogue().order_by(*Release._meta.ordering)
        return Response(s.ReleaseListSerializer(releases, many=True).data)


class ReleaseDetail(JsonAPIView):
    permission_classes = [permissions.AllowAny]

    @extend_schema(
        operation_id="release_retrieve",
        tags=RELEASES,
        summary="Read a release and its files",
        description="One release with every file (path, variant, size, SHA-256), its "
        "parameter count, license and total size, and its `request_form`: the extra "
        "questions an application for it answers (kind, label, help text, required, "
        "options), to build the form from. Anonymous: no token needed.",
        responses={
            200: s.ReleaseDetailSerializer,
            **error_responses(401, 404, notes={**BAD_TOKEN_401, 404: "No release has this slug."}),
        },
    )
    def get(self, request: Request, slug: str) -> Response:
        release = selectors.catalogue().filter(slug=slug).prefetch_related("artifacts").first()
        if release is None:
            raise NotFound(NO_SUCH_RELEASE.format(slug=slug))
        return Response(s.ReleaseDetailSerializer(release).data)


# --- grants and links ------------------------------------------------------------------


class GrantList(JsonAPIView):
    @extend_schema(
        operation_id="grants_list",
        tags=GRANTS,
        summary="List your grants",
        description="Every release you were granted, newest first, revoked ones included: "
        "the release's files, and the state of the grant's latest download link (expiry, "
        "budget and what is left of it per file). Never a link's token: to download, issue "
        "a fresh link with `grant_links_create`.",
        responses={200: s.GrantSerializer(many=True), **error_responses(401)},
    )
    def get(self, request: Request) -> Response:
        return Response(s.GrantSerializer(grant_states_for(user=request.user), many=True).data)


class GrantDetail(JsonAPIView):
    @extend_schema(
        operation_id="grant_retrieve",
        tags=GRANTS,
        summary="Read one of your grants",
        description="One grant as `grants_list` shows it: the release's files and the "
        "state of its latest download link, with what is left of the budget per file.",
        responses={200: s.GrantSerializer, **error_responses(401, 404, notes=NOT_YOURS_404)},
    )
    def get(self, request: Request, pk: int) -> Response:
        state = grant_state_for(user=request.user, grant_id=pk)
        if state is None:
            raise NotFound(NO_SUCH_GRANT)
        return Response(s.GrantSerializer(state).data)


def issued_link_body(request: HttpRequest, issued: IssuedLink) -> dict:
    def absolute(name: str) -> str:
        return request.build_absolute_uri(reverse(name, args=[issued.token]))

    url = absolute("weights:landing")
    return {
        "url": url,
        "manifest_url": absolute("weights:manifest"),
        "download_script_url": absolute("weights:download_script"),
        "llama_stack_url": absolute("weights:llama_stack_manifest"),
        "cli_command": f'python -m weights.download "{url}"',
        "hint": issued.link.token_hint,
        "expires_at": issued.link.expires_at,
        "budget_copies": issued.link.budget_copies,
        "manifest": manifest_body(request, issued.link, issued.token),
    }


class GrantLinkCreate(JsonAPIView):
    @extend_schema(
        operation_id="grant_links_create",
        tags=GRANTS,
        summary="Issue a fresh download link for one of your grants",
        description="Creates a new link and returns it this once, with its manifest (the "
        "files, their checksums and download URLs); the grant's previous link stops working. "
        "Requests count against one hourly allowance per user (WEIGHTS_FRESH_LINK_RATE), "
        "shared with the My downloads page and counted whether or not a link is issued. The "
        "link itself needs no token: anyone holding it downloads, within its budget.",
        request=None,
        parameters=[RETRY_AFTER],
        responses={
            201: s.IssuedLinkSerializer,
            **error_responses(
                401,
                404,
                409,
                429,
                notes={
                    **NOT_YOURS_404,
                    409: "The grant was revoked (`grant_revoked`).",
                    429: "Too many fresh links this hour, on this API and the page together.",
                },
            ),
        },
    )
    def post(self, request: Request, pk: int) -> Response:
        grant = Grant.objects.filter(user=request.user, pk=pk).select_related("release").first()
        if grant is None:
            raise NotFound(NO_SUCH_GRANT)
        issued = fresh_link_issue(request=request._request, grant=grant)
        body = s.IssuedLinkSerializer(issued_link_body(request, issued)).data
        response = Response(body, status=status.HTTP_201_CREATED)
        response["Cache-Control"] = "no-store"  # the body holds the link's token
        return response
