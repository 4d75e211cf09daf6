"""A fresh download link on request: the rule the My downloads page and the API share.

Issuing revokes the grant's live link (weights.services.links.link_issue). Requests are
counted per user in one django-ratelimit bucket for every door (WEIGHTS_FRESH_LINK_RATE,
fixed windows in the shared cache), attempts included, so that neither door can be used
to mint links faster than the other allows.
"""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest
from django_ratelimit.core import get_usage

from access import errors
from access.models import Grant
from weights.services.links import IssuedLink, LinkRefused, link_issue

FRESH_LINK_LIMITED = "You requested several fresh links recently; try again in an hour."
NO_SUCH_GRANT = "No such grant."
RATE_GROUP = "weights.fresh_link"


class FreshLinkLimited(errors.ServiceError):
    code = "throttled"
    http_status = 429

    def __init__(self, *, retry_after: int) -> None:
        super().__init__(FRESH_LINK_LIMITED)
        self.retry_after = retry_after


class GrantRevoked(errors.IllegalTransition):
    code = "grant_revoked"


def fresh_link_issue(*, request: HttpRequest, grant: Grant) -> IssuedLink:
    """A new link for `grant`, one of the signed-in user's (request.user), within the
    allowance; the previous link stops working. The token is in the result only."""
    if grant.user_id != request.user.pk:
        raise errors.NotFound(NO_SUCH_GRANT)
    usage = get_usage(
        request,
        group=RATE_GROUP,
        key="user",
        rate=settings.WEIGHTS_FRESH_LINK_RATE,
        increment=True,
    )
    if usage is not None and usage["should_limit"]:
        raise FreshLinkLimited(retry_after=max(1, usage["time_left"]))
    try:
        return link_issue(grant=grant)
    except LinkRefused as exc:  # the grant was revoked
        raise GrantRevoked(str(exc)) from None
