"""Personal API tokens over the API: mint one from a signed-in session, list and revoke.

The rules are access.tokens', shared with the page /account/api-tokens/: the same limits,
the same hourly allowance, the same second-factor rule for staff. A token can list and
revoke tokens but never mint one: minting needs the session itself, so a leaked token
cannot renew itself or outlive its own expiry.
"""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from drf_spectacular.utils import extend_schema
from rest_framework import permissions, status
from rest_framework.exceptions import NotAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from access import serializers as s
from access import tokens as token_services
from access.api import JsonAPIView, parse
from access.models import ApiToken
from portal.api_errors import RETRY_AFTER, error_responses

TOKENS = ["tokens"]
SIGN_IN_FIRST = (
    "Sign in on the site first: a token is minted from a signed-in session (POST here with "
    "its CSRF token), or on /account/api-tokens/."
)
NOT_FROM_A_TOKEN = (
    "An API token cannot mint tokens. Sign in on the site and use /account/api-tokens/, or "
    "POST here from that session."
)


class SignedInSession(permissions.BasePermission):
    """A signed-in browser session, never an API token."""

    message, code = NOT_FROM_A_TOKEN, "session_required"

    def has_permission(self, request: Request, view: APIView) -> bool:
        if not request.user.is_authenticated:
            raise NotAuthenticated(SIGN_IN_FIRST)
        return not isinstance(request.auth, ApiToken)


def _no_store(response: Response) -> Response:
    response["Cache-Control"] = "no-store"
    return response


class TokenListCreate(JsonAPIView):
    def get_permissions(self) -> list[permissions.BasePermission]:
        if self.request.method == "POST":
            return [SignedInSession()]
        return [permissions.IsAuthenticated()]

    @extend_schema(
        operation_id="tokens_list",
        tags=TOKENS,
        summary="List your API tokens",
        description="Your tokens that still work, newest first: their public `key` (the "
        "first characters), name, dates and whether they act as a reviewer. Never a secret.",
        responses={200: s.TokenSerializer(many=True), **error_responses(401)},
    )
    def get(self, request: Request) -> Response:
        tokens = token_services.tokens_of(request.user)
        return Response(s.TokenSerializer(tokens, many=True).data)

    @extend_schema(
        operation_id="tokens_create",
        tags=TOKENS,
        summary="Mint an API token from your signed-in session",
        description="Only a signed-in session may call this (cookie plus the `X-CSRFToken` "
        "header), never a token. The secret is in this response only; it is stored as a "
        "digest. Staff get a token only from a session that signed in with their "
        "authenticator code, and only such tokens act as a reviewer. The page "
        "/account/api-tokens/ does the same, within the same hourly allowance "
        "(PORTAL_API_TOKEN_CREATE_RATE) and the same limits (PORTAL_API_TOKENS_PER_USER, "
        "lifetime).",
        auth=[{"cookieAuth": []}],
        request=s.TokenCreateSerializer,
        parameters=[RETRY_AFTER],
        responses={
            201: s.TokenCreatedSerializer,
            **error_responses(
                400,
                401,
                403,
                409,
                413,
                415,
                429,
                notes={
                    400: "A name that is blank, too long or holds invisible characters, or "
                    "a lifetime out of range (`errors` names `name` or `days`).",
                    401: "No signed-in session.",
                    403: "Called with a token (`session_required`), a staff session without "
                    "a second factor (`second_factor_required`), or no CSRF token.",
                    409: "You hold the most tokens allowed (`too_many_tokens`).",
                },
            ),
        },
    )
    def post(self, request: Request) -> Response:
        data = parse(s.TokenCreateSerializer, request)
        issued = token_services.token_create_from_session(
            request=request._request, name=data["name"], days=data.get("days")
        )
        body = {**s.TokenSerializer(issued.token).data, "token": issued.secret}
        return _no_store(Response(body, status=status.HTTP_201_CREATED))


class TokenDetail(JsonAPIView):
    @extend_schema(
        operation_id="token_revoke",
        tags=TOKENS,
        summary="Revoke one of your API tokens",
        description="The token stops working at once. `key` is the token's public prefix "
        "(from `tokens_list`); a token may revoke itself.",
        responses={
            204: None,
            **error_responses(401, 404, notes={404: "No token of yours has this key."}),
        },
    )
    def delete(self, request: Request, key: str) -> Response:
        user: AbstractBaseUser = request.user
        token_services.token_revoke(user=user, token_key=key)
        return Response(status=status.HTTP_204_NO_CONTENT)
