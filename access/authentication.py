"""API authentication: personal tokens (django-rest-knox) sent as `Bearer` or `Token`.

Knox finds the token by its prefix and compares SHA-512 digests in constant time; on top of
that a token is valid only while its owner's password is the one it was minted under, so a
password change through any door (allauth, the admin, `changepassword`) ends every token.
"""

from __future__ import annotations

from datetime import timedelta
from hmac import compare_digest

from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from knox.auth import TokenAuthentication
from rest_framework import exceptions
from rest_framework.authentication import get_authorization_header
from rest_framework.request import Request

from access.models import ApiToken
from access.tokens import password_stamp

SCHEMES = (b"bearer", b"token")
PASSWORD_CHANGED = "This token ended when the account's password changed; create a new one."
LAST_USED_EVERY = timedelta(minutes=5)  # at most one write per token per 5 minutes


class ApiTokenAuthentication(TokenAuthentication):
    def authenticate(self, request: Request):
        auth = get_authorization_header(request).split()
        if not auth or auth[0].lower() not in SCHEMES:
            return None  # not ours: session authentication may still apply
        if len(auth) != 2:
            raise exceptions.AuthenticationFailed(
                "Invalid Authorization header: send 'Bearer <token>'."
            )
        try:
            auth[1].decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed("Invalid token.") from None
        return self.authenticate_credentials(auth[1])

    def validate_user(self, auth_token: ApiToken):
        user, token = super().validate_user(auth_token)
        if not compare_digest(token.password_stamp, password_stamp(user)):
            token.delete()
            raise exceptions.AuthenticationFailed(PASSWORD_CHANGED)
        now = timezone.now()
        if token.last_used_at is None or now - token.last_used_at > LAST_USED_EVERY:
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return user, token

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'


class ApiTokenScheme(OpenApiAuthenticationExtension):
    target_class = "access.authentication.ApiTokenAuthentication"
    name = "apiToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": (
                "A personal API token. Get one on the page /account/api-tokens/, or with "
                "`POST /api/tokens/` (operation tokens_create) from a signed-in session: the "
                "session cookie plus its CSRF token in `X-CSRFToken`; a token cannot mint "
                "tokens. Staff must have signed in with their authenticator code for the token "
                "to act as a reviewer. The secret is shown once, expires (30 days by default) "
                "and ends when revoked (`DELETE /api/tokens/{key}/`) or when the password "
                "changes. Send `Authorization: Bearer <token>` (`Authorization: Token <token>` "
                "is accepted too). The same token is the Hugging Face token for `hf download` "
                "and `from_pretrained` with HF_ENDPOINT set to the portal."
            ),
        }
