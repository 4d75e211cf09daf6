"""The review queue's team work in the admin: claims, age, flags per row, keyboard keys.

Mixed into ApplicationAdmin (access.admin). The changelist computes every row's screening
flags for the page at once (access.selectors.screening_flags_for), so the page runs the
same number of queries for 5 rows or 500 and for 100 applications or 100,000.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.text import smart_split, unescape_string_literal
from django.views.decorators.http import require_POST

from access.errors import InvalidInput, ServiceError
from access.models import Application
from access.selectors import ScreeningFlag, screening_flags_for
from access.services import claims
from access.services.reviews import DECIDABLE

# Single keys on the change page (access/static/access/review_keys.js); also accesskeys.
DECISION_KEYS = {"approve": "a", "reject": "r"}
NEXT_KEY, CLAIM_KEY = "n", "c"
# Above this many matching accounts a search matches them by subquery instead of by id list.
SEARCH_USER_IDS = 5000


def format_age(age: timedelta) -> str:
    minutes = int(age.total_seconds() // 60)
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min"


class QueueChangeList(ChangeList):
    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        rows = list(self.result_list)  # evaluates the page once; the template reuses it
        flags = screening_flags_for(rows)
        for row in rows:
            row.screening_flags_cached = flags[row.pk]


class QueueAdminMixin:
    class ClaimFilter(admin.SimpleListFilter):
        title, parameter_name = "claim", "claim"

        def lookups(self, request, model_admin):
            return (
                ("mine", "Held by me"),
                ("unclaimed", "Unclaimed"),
                ("others", "Held by others"),
            )

        def queryset(self, request, queryset):
            live = claims.live_claim_q()
            if self.value() == "mine":
                return queryset.filter(live, claimed_by=request.user)
            if self.value() == "unclaimed":
                return queryset.filter(status__in=DECIDABLE).exclude(live)
            if self.value() == "others":
                return queryset.filter(live).exclude(claimed_by=request.user)
            return queryset

    def get_search_results(self, request: HttpRequest, queryset, search_term: str):
        """Every word in a name, email, affiliation or the account's email (icontains).

        As Django's own search, but the account email is matched first, into a list of
        user ids: an OR across a join keeps PostgreSQL from using the trigram indexes
        (access.search_indexes), and the search then scans the whole table twice.
        """
        users = get_user_model().objects.all()
        for word in smart_split(search_term):
            if word.startswith(('"', "'")) and word[0] == word[-1]:
                word = unescape_string_literal(word)
            if not word:
                continue
            matching = users.filter(email__icontains=word).values_list("pk", flat=True)
            ids = list(matching[: SEARCH_USER_IDS + 1])
            by_account = (
                Q(applicant_id__in=ids)
                if len(ids) <= SEARCH_USER_IDS
                else Q(applicant__in=matching)
            )
            queryset = queryset.filter(
                Q(full_name__icontains=word)
                | Q(institutional_email__icontains=word)
                | Q(affiliation__icontains=word)
                | by_account
            )
        return queryset, False

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return QueueChangeList

    def flags_of(self, obj: Application) -> list[ScreeningFlag]:
        cached = getattr(obj, "screening_flags_cached", None)
        return cached if cached is not None else screening_flags_for([obj])[obj.pk]

    # The CountryField's own display walks all 250 choices per row (9 ms each).
    @admin.display(description="country", ordering="country")
    def country_name(self, obj: Application) -> str:
        return obj.country.name if obj.country else "—"

    @admin.display(description="age", ordering="submitted_at")
    def age(self, obj: Application) -> str:
        if obj.submitted_at is None:
            return "—"
        return format_html(
            '<span title="submitted {}">{}</span>',
            obj.submitted_at.isoformat(timespec="minutes"),
            format_age(timezone.now() - obj.submitted_at),
        )

    @admin.display(description="held by")
    def held_by(self, obj: Application) -> str:
        state = claims.claim_of(obj)
        if not state.held:
            return "—"
        return format_html(
            '<span class="claim" title="since {}">{} · {}</span>',
            state.since.isoformat(timespec="minutes"),
            state.holder_email,
            format_age(timezone.now() - state.since),
        )

    # --- claims on the change page -------------------------------------------

    def claim_context(self, request: HttpRequest, obj: Application) -> dict[str, Any]:
        state = claims.claim_of(obj)
        may_decide = self.has_decide_permission(request)
        reviewers = []
        if may_decide and obj.status in DECIDABLE:
            reviewers = list(
                get_user_model()
                .objects.filter(
                    is_active=True, is_staff=True, groups__name=settings.PORTAL_REVIEWERS_GROUP
                )
                .exclude(pk__in=[obj.applicant_id, request.user.pk])
                .order_by("email")
                .values_list("pk", "email")
            )
        return {
            "claim": state,
            "claim_mine": state.held and state.holder_id == request.user.pk,
            "claim_expires": state.since + claims.claim_timeout() if state.held else None,
            "claimable": may_decide and obj.status in DECIDABLE,
            "claim_reviewers": reviewers,
            "claim_url": reverse("admin:access_application_claim", args=[obj.pk]),
            "release_url": reverse("admin:access_application_release_claim", args=[obj.pk]),
            "reassign_url": reverse("admin:access_application_reassign_claim", args=[obj.pk]),
            "next_url": reverse("admin:access_application_next_unclaimed") + f"?after={obj.pk}",
            "keys": {"next": NEXT_KEY, "claim": CLAIM_KEY, **DECISION_KEYS},
        }

    def claim_urls(self) -> list:
        wrap = self.admin_site.admin_view
        return [
            path(
                "<int:object_id>/claim/",
                wrap(require_POST(self.claim_view)),
                name="access_application_claim",
            ),
            path(
                "<int:object_id>/release-claim/",
                wrap(require_POST(self.release_claim_view)),
                name="access_application_release_claim",
            ),
            path(
                "<int:object_id>/reassign-claim/",
                wrap(require_POST(self.reassign_claim_view)),
                name="access_application_reassign_claim",
            ),
            path(
                "next-unclaimed/",
                wrap(self.next_unclaimed_view),
                name="access_application_next_unclaimed",
            ),
        ]

    def _claim_action(
        self, request: HttpRequest, object_id: int, act: Callable[[Application], str]
    ) -> HttpResponse:
        if not self.has_decide_permission(request):
            raise PermissionDenied
        application = self.get_object(request, str(object_id))
        if application is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, str(object_id))
        try:
            done = act(application)
        except ServiceError as exc:
            self.message_user(request, str(exc), messages.ERROR)
        else:
            self.message_user(request, done, messages.SUCCESS)
        back = request.POST.get("next", "")
        if not url_has_allowed_host_and_scheme(back, allowed_hosts={request.get_host()}):
            back = reverse("admin:access_application_change", args=[application.pk])
        return HttpResponseRedirect(back)

    def claim_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        takeover = request.POST.get("takeover") == "1"

        def act(application: Application) -> str:
            claims.claim_take(application=application, reviewer=request.user, takeover=takeover)
            return f"You hold {application} for {claims.claim_timeout()}."

        return self._claim_action(request, object_id, act)

    def release_claim_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        def act(application: Application) -> str:
            claims.claim_release(application=application, reviewer=request.user)
            return f"Released {application}."

        return self._claim_action(request, object_id, act)

    def reassign_claim_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        takeover = request.POST.get("takeover") == "1"

        def act(application: Application) -> str:
            chosen = request.POST.get("to", "")
            to = (
                get_user_model().objects.filter(pk=int(chosen)).first()
                if chosen.isdigit()
                else None
            )
            if to is None:
                raise InvalidInput(claims.REASSIGN_TARGET, code="not_reviewer_target")
            claims.claim_reassign(
                application=application, reviewer=request.user, to=to, takeover=takeover
            )
            return f"{application} is now held by {to.email}."

        return self._claim_action(request, object_id, act)

    def next_unclaimed_view(self, request: HttpRequest) -> HttpResponse:
        """The oldest application awaiting a decision that nobody else holds."""
        queue = (
            self.get_queryset(request)
            .filter(status__in=DECIDABLE)
            .filter(
                Q(claimed_by__isnull=True)
                | Q(claimed_at__lt=claims.claim_cutoff())
                | Q(claimed_by=request.user)
            )
            .exclude(applicant=request.user)
        )
        after = request.GET.get("after", "")
        if after.isdigit():
            queue = queue.exclude(pk=int(after))
        found = queue.order_by("submitted_at", "pk").values_list("pk", flat=True).first()
        if found is None:
            self.message_user(request, "Nothing unclaimed awaits a decision.", messages.INFO)
            return HttpResponseRedirect(reverse("admin:access_application_changelist"))
        return HttpResponseRedirect(reverse("admin:access_application_change", args=[found]))

    # --- decisions respect claims ----------------------------------------------

    def run_unless_held(
        self, run: Callable[..., object], application: Application, reviewer: Any, data: dict
    ) -> object:
        """Decide unless another reviewer holds the application; a decision ends the claim."""
        claims.claim_guard(application=application, reviewer=reviewer)
        outcome = run(application, reviewer, data)
        claims.claim_clear([application.pk])
        return outcome

    # --- actions on selected rows ------------------------------------------------

    @admin.action(description="Claim selected (hold them for me)", permissions=["decide"])
    def claim_selected(self, request: HttpRequest, queryset) -> None:
        self._each_claim(request, queryset, "Claimed", claims.claim_take)

    @admin.action(description="Release my claim on selected", permissions=["decide"])
    def release_selected(self, request: HttpRequest, queryset) -> None:
        self._each_claim(request, queryset, "Released", claims.claim_release)

    def _each_claim(self, request: HttpRequest, queryset, done: str, act: Callable) -> None:
        from access.admin_actions import run_each

        run_each(
            self,
            request,
            list(queryset),
            lambda obj: act(application=obj, reviewer=request.user),
            done,
        )
