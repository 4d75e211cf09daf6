"""Claims over the review API: hold an application while reading it, give it back.

`POST /api/review/applications/{id}/claim/` and `.../release-claim/`; the queue's rows
(access.claim_serializers) say who holds each application, since when, and its age.
"""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from access.api import NOT_IN_QUEUE_404, REVIEW, ReviewerView, parse, review_errors
from access.claim_serializers import ClaimRequestSerializer, ClaimSerializer, claim_data
from access.services import claims
from portal.api_errors import RETRY_AFTER

CLAIM_ERRORS = (400, 404, 409, 413, 415)


class ReviewClaim(ReviewerView):
    @extend_schema(
        operation_id="review_application_claim",
        tags=REVIEW,
        summary="Claim an application (hold it while you review it)",
        description="Holds the application for PORTAL_REVIEW_CLAIM_MINUTES; claiming again "
        "renews the claim. The queue (`review_applications_list`) shows every reviewer who "
        "holds what and since when; the admin refuses another reviewer's decision until the "
        "claim expires or they take it over (`takeover: true`). A decided application is "
        "held by nobody.",
        request=ClaimRequestSerializer,
        parameters=[RETRY_AFTER],
        responses={
            200: ClaimSerializer,
            **review_errors(
                *CLAIM_ERRORS,
                notes={
                    **NOT_IN_QUEUE_404,
                    409: "Another reviewer holds it (`claimed_by_other`) or it is not "
                    "awaiting a decision (`not_claimable`).",
                },
            ),
        },
    )
    def post(self, request: Request, pk: int) -> Response:
        application = self.get_application(pk)
        data = parse(ClaimRequestSerializer, request)
        state = claims.claim_take(
            application=application, reviewer=request.user, takeover=data["takeover"]
        )
        return Response(ClaimSerializer(claim_data(application, state)).data)


class ReviewReleaseClaim(ReviewerView):
    @extend_schema(
        operation_id="review_application_release_claim",
        tags=REVIEW,
        summary="Release your claim on an application",
        description="Gives the application back to the queue. Releasing an application "
        "nobody holds does nothing; another reviewer's live claim is refused.",
        request=None,
        parameters=[RETRY_AFTER],
        responses={
            200: ClaimSerializer,
            **review_errors(
                404,
                409,
                notes={**NOT_IN_QUEUE_404, 409: "Another reviewer holds it (`claimed_by_other`)."},
            ),
        },
    )
    def post(self, request: Request, pk: int) -> Response:
        application = self.get_application(pk)
        claims.claim_release(application=application, reviewer=request.user)
        return Response(
            ClaimSerializer(claim_data(application, claims.ClaimState(None, "", None))).data
        )
