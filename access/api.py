"""REST API: thin views over access services.

Each view parses its body with a serializer, calls a service and renders the result.
Every error, whoever raises it, is the envelope of portal.api_errors. Every lookup is
scoped: a researcher's id space is their own applications, a reviewer's is the review
queue; anything else is a 404. The catalogue and the grants live in weights.api, the
tokens in access.token_api.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import generics, permissions, status
from rest_framework.exceptions import NotFound
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import Serializer
from rest_framework.views import APIView

from access import errors, selectors
from access import serializers as s
from access.claim_serializers import ReviewQueueRowSerializer
from access.models import Application, LicenseAcceptance, LicenseVersion
from access.request_form_serializers import answers_as_field_errors
from access.second_factor import NEEDS_SECOND_FACTOR, second_factor_satisfied
from access.services import applications as application_services
from access.services import licenses as license_services
from access.services import reviews as review_services
from access.services import throttles
from portal.api_errors import RETRY_AFTER, error_responses
from portal.api_parsers import JSONParser
from portal.http import client_ip, user_agent

NOT_FOUND = "No such application."
NO_LICENSE = errors.NO_CURRENT_LICENSE

LICENSE, APPLICATIONS, REVIEW = ["license"], ["applications"], ["review"]
# Each reviewer endpoint may also say 403 (not a reviewer, no second factor) and 429.
REVIEWER_403 = {
    403: "Not a reviewer (`not_reviewer`), a request without a second factor "
    "(`second_factor_required`), or your own application (`own_application`)."
}
REVIEW_429 = "The review API allows PORTAL_REVIEW_API_RATE requests per reviewer."
NOT_YOURS_404 = {404: "No application of yours has this id."}
NOT_IN_QUEUE_404 = {404: "No submitted application has this id."}


def parse(serializer_class: type[Serializer], request: Request, **context: Any) -> dict:
    serializer = serializer_class(data=request.data, context={"request": request, **context})
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def accept_license(request: Request, license_version: LicenseVersion) -> LicenseAcceptance:
    return license_services.license_accept(
        user=request.user,
        license_version=license_version,
        ip_address=client_ip(request),
        user_agent=user_agent(request),
    )


class Page(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 200


class IsReviewer(permissions.BasePermission):
    """A reviewer, on a request backed by a second factor (access.second_factor)."""

    message, code = errors.NOT_REVIEWER, "not_reviewer"

    def has_permission(self, request: Request, view: APIView) -> bool:
        if not review_services.is_reviewer(request.user):
            return False
        if not second_factor_satisfied(request):
            self.message, self.code = NEEDS_SECOND_FACTOR, "second_factor_required"
            return False
        return True


class JsonAPIView(APIView):
    # JSON only: no multipart, so no file uploads to spool; bodies over
    # DATA_UPLOAD_MAX_MEMORY_SIZE are refused by Django (413 via api_errors).
    parser_classes = [JSONParser]


class ResearcherView(JsonAPIView):
    def get_application(self, pk: int) -> Application:
        try:
            return selectors.applications_for(user=self.request.user).get(pk=pk)
        except Application.DoesNotExist:
            raise NotFound(NOT_FOUND) from None

    def respond(self, application: Application, code: int = status.HTTP_200_OK) -> Response:
        return Response(s.ApplicationSerializer(application).data, status=code)


class ReviewerView(JsonAPIView):
    permission_classes = [permissions.IsAuthenticated, IsReviewer]
    throttle_scope = "review"

    def get_application(self, pk: int) -> Application:
        try:
            return selectors.review_queue().get(pk=pk)
        except Application.DoesNotExist:
            raise NotFound(NOT_FOUND) from None

    def respond(self, pk: int) -> Response:
        return Response(s.ReviewApplicationSerializer(self.get_application(pk)).data)


def review_errors(*statuses: int, notes: dict[int, str] | None = None) -> dict:
    return error_responses(
        *statuses, 401, 403, 429, notes={**REVIEWER_403, 429: REVIEW_429, **(notes or {})}
    )


# --- License -------------------------------------------------------------------------


class CurrentLicense(JsonAPIView):
    @extend_schema(
        operation_id="license_retrieve",
        tags=LICENSE,
        summary="Read the license in effect",
        description="The current license version with its full text and SHA-256, and "
        "whether you have accepted it. Applying and downloading need the current version "
        "accepted.",
        responses={
            200: s.LicenseSerializer,
            **error_responses(401, 404, notes={404: "No license is in effect yet."}),
        },
    )
    def get(self, request: Request) -> Response:
        current = license_services.license_current()
        if current is None:
            raise NotFound(NO_LICENSE)
        return Response(s.LicenseSerializer(current, context={"request": request}).data)


class LicenseAccept(JsonAPIView):
    @extend_schema(
        operation_id="license_accept",
        tags=LICENSE,
        summary="Accept the license in effect",
        description="Records your acceptance of the current version, with your IP address "
        "and user agent. Send `version` to make sure you accept the text you read; an older "
        "version is refused. Accepting again is harmless.",
        request=s.LicenseAcceptSerializer,
        responses={
            200: s.LicenseAcceptanceSerializer,
            **error_responses(400, 401, 404, 413, 415, notes={404: "No license is in effect yet."}),
        },
    )
    def post(self, request: Request) -> Response:
        current = license_services.license_current()
        if current is None:
            raise NotFound(NO_LICENSE)
        parse(s.LicenseAcceptSerializer, request, license=current)
        acceptance = accept_license(request, current)
        return Response(s.LicenseAcceptanceSerializer(acceptance).data)


# --- Researcher ----------------------------------------------------------------------


class ApplicationListCreate(ResearcherView, generics.GenericAPIView):
    serializer_class = s.ApplicationSummarySerializer
    pagination_class = Page

    def get_queryset(self) -> QuerySet[Application]:
        return selectors.applications_for(user=self.request.user).order_by("-created_at", "-pk")

    @extend_schema(
        operation_id="applications_list",
        tags=APPLICATIONS,
        summary="List your applications",
        description="Your applications, newest first, paginated (`page`, `page_size`).",
        responses={
            200: s.ApplicationSummarySerializer(many=True),
            **error_responses(401, 404, notes={404: "A page past the last one."}),
        },
    )
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(self.get_serializer(page, many=True).data)

    @extend_schema(
        operation_id="applications_create",
        tags=APPLICATIONS,
        summary="Start an application (a draft)",
        description="Creates a draft with the fields given; every field is optional until "
        "you submit. One application may be open at a time. Your email address must be "
        "verified. `answers` answers the extra questions of the requested releases "
        "(`release_retrieve` lists them): `{release_slug: {question_key: value}}`; a bad "
        "answer is a 400 naming `answers.<slug>.<key>`, and nothing is saved.",
        request=s.ApplicationWriteSerializer,
        responses={
            201: s.ApplicationSerializer,
            **error_responses(
                400,
                401,
                403,
                409,
                413,
                415,
                notes={
                    403: "Email address not verified (`email_not_verified`).",
                    409: "You already have an open application (`already_open`).",
                },
            ),
        },
    )
    def post(self, request: Request) -> Response:
        data = parse(s.ApplicationWriteSerializer, request)
        releases, answers = data.pop("releases", None), data.pop("answers", None)
        with answers_as_field_errors():
            application = application_services.application_save_draft(
                applicant=request.user, fields=data, releases=releases, answers=answers
            )
        return self.respond(application, status.HTTP_201_CREATED)


class ApplicationDetail(ResearcherView):
    @extend_schema(
        operation_id="application_retrieve",
        tags=APPLICATIONS,
        summary="Read one of your applications",
        description="Your answers, its status, the timeline of events (questions from "
        "reviewers included) and the grants it led to.",
        responses={200: s.ApplicationSerializer, **error_responses(401, 404, notes=NOT_YOURS_404)},
    )
    def get(self, request: Request, pk: int) -> Response:
        return self.respond(self.get_application(pk))

    @extend_schema(
        operation_id="application_update",
        tags=APPLICATIONS,
        summary="Edit a draft",
        description="Changes the fields given and leaves the others (in `answers`, the "
        "questions given). Only a draft can be edited; a submitted application is answered "
        "through `application_answer`.",
        request=s.ApplicationWriteSerializer,
        responses={
            200: s.ApplicationSerializer,
            **error_responses(
                400,
                401,
                404,
                409,
                413,
                415,
                notes={**NOT_YOURS_404, 409: "The application is no longer a draft."},
            ),
        },
    )
    def patch(self, request: Request, pk: int) -> Response:
        application = self.get_application(pk)
        data = parse(s.ApplicationWriteSerializer, request)
        releases, answers = data.pop("releases", None), data.pop("answers", None)
        with answers_as_field_errors():
            application = application_services.application_save_draft(
                applicant=request.user,
                fields=data,
                releases=releases,
                application=application,
                answers=answers,
            )
        return self.respond(application)


class ApplicationSubmit(ResearcherView):
    # The allowance (access.services.throttles) counts successful submissions only, so a
    # 400 or 409 here costs nothing; a 429 carries Retry-After.
    @extend_schema(
        operation_id="application_submit",
        tags=APPLICATIONS,
        summary="Submit a draft for review",
        description="Accepts the current license and submits the draft, together or not "
        "at all. Every required field must be filled in (the 400 lists those missing), and "
        "every required question of the requested releases answered (a 400 naming each "
        "missing `answers.<slug>.<key>`). "
        "Reviewers are notified by email. Only successful submissions count against the "
        "allowance (PORTAL_SUBMIT_RATE).",
        request=s.SubmitSerializer,
        parameters=[RETRY_AFTER],
        responses={
            200: s.ApplicationSerializer,
            **error_responses(
                400,
                401,
                403,
                404,
                409,
                413,
                415,
                429,
                notes={
                    **NOT_YOURS_404,
                    403: "Email address not verified (`email_not_verified`).",
                    409: "The application is not a draft.",
                },
            ),
        },
    )
    def post(self, request: Request, pk: int) -> Response:
        application = self.get_application(pk)
        parse(s.SubmitSerializer, request)
        # Acceptance and submission stand or fall together.
        with answers_as_field_errors(), transaction.atomic():
            throttles.submission_allowance_check(user=request.user)
            current = license_services.license_current()
            acceptance = None if current is None else accept_license(request, current)
            application = application_services.application_submit(
                application=application, applicant=request.user, license_acceptance=acceptance
            )
        return self.respond(application)


class ApplicationWithdraw(ResearcherView):
    @extend_schema(
        operation_id="application_withdraw",
        tags=APPLICATIONS,
        summary="Withdraw an open application",
        description="Ends a draft, submitted or questioned application; you may then "
        "start a new one. A decided application cannot be withdrawn.",
        request=None,
        responses={
            200: s.ApplicationSerializer,
            **error_responses(
                401, 404, 409, notes={**NOT_YOURS_404, 409: "The application is decided."}
            ),
        },
    )
    def post(self, request: Request, pk: int) -> Response:
        application = application_services.application_withdraw(
            application=self.get_application(pk), applicant=request.user
        )
        return self.respond(application)


class ApplicationAnswer(ResearcherView):
    @extend_schema(
        operation_id="application_answer",
        tags=APPLICATIONS,
        summary="Answer a reviewer's question",
        description="When a reviewer asked for more information (status "
        "`info_requested`), your answer returns the application to the queue.",
        request=s.AnswerSerializer,
        responses={
            200: s.ApplicationSerializer,
            **error_responses(
                400,
                401,
                404,
                409,
                413,
                415,
                notes={**NOT_YOURS_404, 409: "No question is waiting for an answer."},
            ),
        },
    )
    def post(self, request: Request, pk: int) -> Response:
        application = self.get_application(pk)
        data = parse(s.AnswerSerializer, request)
        application = application_services.application_answer(
            application=application, applicant=request.user, answer=data["answer"]
        )
        return self.respond(application)


# --- Reviewer ------------------------------------------------------------------------


class ReviewQueue(ReviewerView, generics.ListAPIView):
    serializer_class = ReviewQueueRowSerializer  # who holds each row, since when, its age
    pagination_class = Page

    def get_queryset(self) -> QuerySet[Application]:
        query = s.QueueFilterSerializer(data=self.request.query_params)
        query.is_valid(raise_exception=True)
        filters = query.validated_data
        return selectors.review_queue_filtered(
            statuses=filters.get("status") or review_services.DECIDABLE,
            updated_since=filters.get("updated_since"),
            release=filters.get("release"),
            ordering=filters["ordering"],
        )

    @extend_schema(
        operation_id="review_applications_list",
        tags=REVIEW,
        summary="List the review queue",
        description="Submitted applications (by default those awaiting a decision: "
        "submitted and info_requested), oldest submission first, paginated. To poll from an "
        "integration, pass `updated_since` (the largest `updated_at` seen so far) with "
        "`ordering=updated_at`, and filter by `release` or `status` as needed. Needs a "
        "reviewer with a second factor: a session that signed in with TOTP, or a token "
        "minted from one.",
        parameters=[s.QueueFilterSerializer, RETRY_AFTER],
        responses={
            200: ReviewQueueRowSerializer(many=True),
            **review_errors(
                400,
                404,
                notes={
                    400: "A bad filter: `errors` names it (`updated_since`, `ordering`, "
                    "`release` or `status`).",
                    404: "A page past the last one.",
                },
            ),
        },
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class ReviewDetail(ReviewerView):
    @extend_schema(
        operation_id="review_application_retrieve",
        tags=REVIEW,
        summary="Read an application as a reviewer",
        description="Everything the applicant wrote, who they are, the full timeline with "
        "who acted, and automatic screening flags (hints, never decisions).",
        parameters=[RETRY_AFTER],
        responses={
            200: s.ReviewApplicationSerializer,
            **review_errors(404, notes=NOT_IN_QUEUE_404),
        },
    )
    def get(self, request: Request, pk: int) -> Response:
        return self.respond(pk)


DECISION_ERRORS = (400, 404, 409, 413, 415)


class ReviewApprove(ReviewerView):
    @extend_schema(
        operation_id="review_application_approve",
        tags=REVIEW,
        summary="Approve an application (all or some releases)",
        description="Grants the listed releases, which must be among those requested. "
        "Each grant gets a download link emailed to the applicant; the applicant can also "
        "issue links through `grant_links_create`.",
        request=s.ApproveSerializer,
        parameters=[RETRY_AFTER],
        responses={
            200: s.ReviewApplicationSerializer,
            **review_errors(
                *DECISION_ERRORS,
                notes={
                    **NOT_IN_QUEUE_404,
                    400: "Releases missing, unknown or not requested (`not_requested`).",
                    409: "The application is not awaiting a decision.",
                },
            ),
        },
    )
    def post(self, request: Request, pk: int) -> Response:
        application = self.get_application(pk)
        data = parse(s.ApproveSerializer, request)
        review_services.application_approve(
            application=application,
            reviewer=request.user,
            releases=data["releases"],
            note=data.get("note", ""),
        )
        return self.respond(pk)


class ReviewReject(ReviewerView):
    @extend_schema(
        operation_id="review_application_reject",
        tags=REVIEW,
        summary="Reject an application",
        description="The reason is required and is emailed to the applicant.",
        request=s.ReasonSerializer,
        parameters=[RETRY_AFTER],
        responses={
            200: s.ReviewApplicationSerializer,
            **review_errors(
                *DECISION_ERRORS,
                notes={**NOT_IN_QUEUE_404, 409: "The application is not awaiting a decision."},
            ),
        },
    )
    def post(self, request: Request, pk: int) -> Response:
        application = self.get_application(pk)
        data = parse(s.ReasonSerializer, request)
        review_services.application_reject(
            application=application, reviewer=request.user, reason=data["reason"]
        )
        return self.respond(pk)


class ReviewRequestInfo(ReviewerView):
    @extend_schema(
        operation_id="review_application_request_info",
        tags=REVIEW,
        summary="Ask the applicant for more information",
        description="The question is emailed to the applicant; the application leaves the "
        "queue (status `info_requested`) until they answer.",
        request=s.QuestionSerializer,
        parameters=[RETRY_AFTER],
        responses={
            200: s.ReviewApplicationSerializer,
            **review_errors(
                *DECISION_ERRORS,
                notes={**NOT_IN_QUEUE_404, 409: "The application is not submitted."},
            ),
        },
    )
    def post(self, request: Request, pk: int) -> Response:
        application = self.get_application(pk)
        data = parse(s.QuestionSerializer, request)
        review_services.application_request_info(
            application=application, reviewer=request.user, question=data["question"]
        )
        return self.respond(pk)


class ReviewRevoke(ReviewerView):
    @extend_schema(
        operation_id="review_application_revoke",
        tags=REVIEW,
        summary="Revoke an approval",
        description="Ends every grant of an approved application at once, download links "
        "included; the reason is emailed to the applicant.",
        request=s.ReasonSerializer,
        parameters=[RETRY_AFTER],
        responses={
            200: s.ReviewApplicationSerializer,
            **review_errors(
                *DECISION_ERRORS,
                notes={**NOT_IN_QUEUE_404, 409: "The application is not approved."},
            ),
        },
    )
    def post(self, request: Request, pk: int) -> Response:
        application = self.get_application(pk)
        data = parse(s.ReasonSerializer, request)
        review_services.application_revoke(
            application=application, reviewer=request.user, reason=data["reason"]
        )
        return self.respond(pk)
