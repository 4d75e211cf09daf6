"""REST API: thin views over access services.

Each view parses its body with a serializer, calls a service and renders the
result. Service errors become {"detail", "code"} with their HTTP status in
portal.api_errors. Every lookup is scoped: a researcher's id space is their own
applications, a reviewer's is the review queue; anything else is a 404.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import generics, permissions, status
from rest_framework.exceptions import NotFound
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import Serializer
from rest_framework.views import APIView

from access import errors, selectors
from access import serializers as s
from access.models import Application, LicenseAcceptance, LicenseVersion
from access.second_factor import NEEDS_SECOND_FACTOR, second_factor_satisfied
from access.services import applications as application_services
from access.services import licenses as license_services
from access.services import reviews as review_services
from access.services import throttles
from portal.api_parsers import JSONParser
from portal.http import client_ip, user_agent
from weights.models import Release

NOT_FOUND = "No such application."
NO_LICENSE = errors.NO_CURRENT_LICENSE

_error = OpenApiResponse(s.ErrorSerializer)
ERRORS = {400: _error, 401: _error, 403: _error, 404: _error, 409: _error, 413: _error}


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

    message = errors.NOT_REVIEWER

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


# --- Catalogue and license -----------------------------------------------------


class ReleaseList(generics.ListAPIView):
    serializer_class = s.ReleaseSerializer
    queryset = Release.objects.all()


class CurrentLicense(JsonAPIView):
    @extend_schema(responses={200: s.LicenseSerializer, 404: _error})
    def get(self, request: Request) -> Response:
        current = license_services.license_current()
        if current is None:
            raise NotFound(NO_LICENSE)
        return Response(s.LicenseSerializer(current, context={"request": request}).data)


class LicenseAccept(JsonAPIView):
    @extend_schema(
        request=s.LicenseAcceptSerializer, responses={200: s.LicenseAcceptanceSerializer, **ERRORS}
    )
    def post(self, request: Request) -> Response:
        current = license_services.license_current()
        if current is None:
            raise NotFound(NO_LICENSE)
        parse(s.LicenseAcceptSerializer, request, license=current)
        acceptance = accept_license(request, current)
        return Response(s.LicenseAcceptanceSerializer(acceptance).data)


# --- Researcher ----------------------------------------------------------------


class ApplicationListCreate(ResearcherView, generics.GenericAPIView):
    serializer_class = s.ApplicationSummarySerializer
    pagination_class = Page

    def get_queryset(self) -> QuerySet[Application]:
        return selectors.applications_for(user=self.request.user).order_by("-created_at", "-pk")

    @extend_schema(responses=s.ApplicationSummarySerializer(many=True))
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(self.get_serializer(page, many=True).data)

    @extend_schema(
        request=s.ApplicationWriteSerializer, responses={201: s.ApplicationSerializer, **ERRORS}
    )
    def post(self, request: Request) -> Response:
        data = parse(s.ApplicationWriteSerializer, request)
        releases = data.pop("releases", None)
        application = application_services.application_save_draft(
            applicant=request.user, fields=data, releases=releases
        )
        return self.respond(application, status.HTTP_201_CREATED)


class ApplicationDetail(ResearcherView):
    @extend_schema(responses={200: s.ApplicationSerializer, 404: _error})
    def get(self, request: Request, pk: int) -> Response:
        return self.respond(self.get_application(pk))

    @extend_schema(
        request=s.ApplicationWriteSerializer, responses={200: s.ApplicationSerializer, **ERRORS}
    )
    def patch(self, request: Request, pk: int) -> Response:
        application = self.get_application(pk)
        data = parse(s.ApplicationWriteSerializer, request)
        releases = data.pop("releases", None)
        application = application_services.application_save_draft(
            applicant=request.user, fields=data, releases=releases, application=application
        )
        return self.respond(application)


class ApplicationSubmit(ResearcherView):
    # The allowance (access.services.throttles) counts successful submissions only, so a
    # 400 or 409 here costs nothing; a 429 carries Retry-After.
    @extend_schema(
        request=s.SubmitSerializer, responses={200: s.ApplicationSerializer, 429: _error, **ERRORS}
    )
    def post(self, request: Request, pk: int) -> Response:
        application = self.get_application(pk)
        parse(s.SubmitSerializer, request)
        # Acceptance and submission stand or fall together.
        with transaction.atomic():
            throttles.submission_allowance_check(user=request.user)
            current = license_services.license_current()
            acceptance = None if current is None else accept_license(request, current)
            application = application_services.application_submit(
                application=application, applicant=request.user, license_acceptance=acceptance
            )
        return self.respond(application)


class ApplicationWithdraw(ResearcherView):
    @extend_schema(request=None, responses={200: s.ApplicationSerializer, **ERRORS})
    def post(self, request: Request, pk: int) -> Response:
        application = application_services.application_withdraw(
            application=self.get_application(pk), applicant=request.user
        )
        return self.respond(application)


class ApplicationAnswer(ResearcherView):
    @extend_schema(request=s.AnswerSerializer, responses={200: s.ApplicationSerializer, **ERRORS})
    def post(self, request: Request, pk: int) -> Response:
        application = self.get_application(pk)
        data = parse(s.AnswerSerializer, request)
        application = application_services.application_answer(
            application=application, applicant=request.user, answer=data["answer"]
        )
        return self.respond(application)


# --- Reviewer ------------------------------------------------------------------


class ReviewQueue(ReviewerView, generics.ListAPIView):
    serializer_class = s.ReviewQueueItemSerializer
    pagination_class = Page

    def get_queryset(self) -> QuerySet[Application]:
        query = s.QueueFilterSerializer(data=self.request.query_params)
        query.is_valid(raise_exception=True)
        statuses = query.validated_data.get("status") or review_services.DECIDABLE
        return selectors.review_queue().filter(status__in=list(statuses))

    @extend_schema(
        parameters=[s.QueueFilterSerializer], responses=s.ReviewQueueItemSerializer(many=True)
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class ReviewDetail(ReviewerView):
    @extend_schema(responses={200: s.ReviewApplicationSerializer, 403: _error, 404: _error})
    def get(self, request: Request, pk: int) -> Response:
        return self.respond(pk)


class ReviewApprove(ReviewerView):
    @extend_schema(
        request=s.ApproveSerializer, responses={200: s.ReviewApplicationSerializer, **ERRORS}
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
        request=s.ReasonSerializer, responses={200: s.ReviewApplicationSerializer, **ERRORS}
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
        request=s.QuestionSerializer, responses={200: s.ReviewApplicationSerializer, **ERRORS}
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
        request=s.ReasonSerializer, responses={200: s.ReviewApplicationSerializer, **ERRORS}
    )
    def post(self, request: Request, pk: int) -> Response:
        application = self.get_application(pk)
        data = parse(s.ReasonSerializer, request)
        review_services.application_revoke(
            application=application, reviewer=request.user, reason=data["reason"]
        )
        return self.respond(pk)
