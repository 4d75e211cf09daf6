"""Review API for grants: list them, give one directly, revoke one.

Thin views over access.services.direct_grants, behind the same reviewer rule as the
decisions (IsReviewer: a reviewer on a request with a second factor).
"""

from __future__ import annotations

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import generics, status
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from access import serializers as s
from access.api import REVIEW, REVIEWER_403, Page, ReviewerView, parse, review_errors
from access.models import Grant
from access.services import direct_grants
from portal.api_errors import RETRY_AFTER

NO_GRANT = "No such grant."
GRANT_404 = {404: "No grant has this id."}
CREATE_403 = {
    403: f"{REVIEWER_403[403][:-1]}, or a grant to yourself (`own_grant`).",
}


def grant_response(grant_id: int, code: int = status.HTTP_200_OK) -> Response:
    grant = direct_grants.grants_for_review().get(pk=grant_id)
    return Response(s.ReviewGrantSerializer(grant).data, status=code)


class ReviewGrantListCreate(ReviewerView, generics.GenericAPIView):
    serializer_class = s.ReviewGrantSerializer
    pagination_class = Page

    def get_queryset(self) -> QuerySet[Grant]:
        query = s.GrantFilterSerializer(data=self.request.query_params)
        query.is_valid(raise_exception=True)
        return direct_grants.grants_for_review(**query.validated_data)

    @extend_schema(
        operation_id="review_grants_list",
        tags=REVIEW,
        summary="List grants",
        description="Every grant, newest first, paginated: from an application "
        "(`application_id`) or given directly (`application_id` null, with "
        "`direct_reason`). Filter by `user` (email or id), `release` (slug) and `active`.",
        parameters=[s.GrantFilterSerializer, RETRY_AFTER],
        responses={
            200: s.ReviewGrantSerializer(many=True),
            **review_errors(
                400,
                404,
                notes={
                    400: "A bad filter: `errors` names it (`user`, `release` or `active`).",
                    404: "A page past the last one.",
                },
            ),
        },
    )
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(self.get_serializer(page, many=True).data)

    @extend_schema(
        operation_id="review_grants_create",
        tags=REVIEW,
        summary="Grant a release directly, without an application",
        description="Gives `release` to an existing active account (a collaborator, a "
        "re-issue) under the current license, with a reason kept for the record. The "
        "account is emailed, then gets a download link as after an approval; it must "
        "still accept the current license before downloading.",
        request=s.DirectGrantCreateSerializer,
        parameters=[RETRY_AFTER],
        responses={
            201: s.ReviewGrantSerializer,
            **review_errors(
                400,
                409,
                413,
                415,
                notes={
                    400: "Unknown account or release, a blank reason (`reason_required`) or "
                    "a disabled account (`inactive`).",
                    **CREATE_403,
                    409: "The account already holds an active grant for the release "
                    "(`already_granted`), or no license is in effect (`no_license`).",
                },
            ),
        },
    )
    def post(self, request: Request) -> Response:
        data = parse(s.DirectGrantCreateSerializer, request)
        grant = direct_grants.grant_direct(reviewer=request.user, **data)
        return grant_response(grant.pk, status.HTTP_201_CREATED)


class ReviewGrantRevoke(ReviewerView):
    @extend_schema(
        operation_id="review_grant_revoke",
        tags=REVIEW,
        summary="Revoke one grant",
        description="Ends this grant and its download links; the application's other "
        "grants stay active. The reason is emailed to the grant's holder.",
        request=s.ReasonSerializer,
        parameters=[RETRY_AFTER],
        responses={
            200: s.ReviewGrantSerializer,
            **review_errors(
                400,
                404,
                409,
                413,
                415,
                notes={
                    **GRANT_404,
                    400: "A blank reason (`reason_required`).",
                    409: "The grant is revoked already (`already_revoked`).",
                },
            ),
        },
    )
    def post(self, request: Request, pk: int) -> Response:
        grant = Grant.objects.filter(pk=pk).first()
        if grant is None:
            raise NotFound(NO_GRANT)
        data = parse(s.ReasonSerializer, request)
        direct_grants.grant_revoke_one(grant=grant, reviewer=request.user, reason=data["reason"])
        return grant_response(grant.pk)
