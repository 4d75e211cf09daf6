"""Approval policies: a release's ordered rules decide its applications, or leave them to a person.

`policy_evaluate` is pure over loaded data (the policy and its rules compiled once, the
applicant's `Facts` read once), so thousands of applications a second are evaluated.
`policies_apply` runs after a submission or an answer and acts through the reviewer's
own services (access.services.reviews), so grants, emails, download links and webhooks are
exactly a person's; the event names the policy and rule instead of a reviewer.

One application carries one decision for all its releases (the status machine has no
per-release state), so releases are combined:
- every requested release approved by its policy → approve them all;
- else any rule requests information → ask (its stock question), and after the answer the
  policies run again; a rule whose question was already answered holds instead of asking twice;
- else → hold for a person, with a "held" event saying which rule held which release and
  which releases the policy would approve. Nothing is approved in part: approving some
  releases would close the application, so the rest would leave the queue undecided.
Manual releases (no policy, or mode manual) always leave the application to a person.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from allauth.account.models import EmailAddress
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Prefetch

from access import errors
from access.models import Application, ApplicationEvent, ApprovalPolicy, PolicyRule
from access.policy_conditions import Facts, Test, conditions_compile
from access.services import outbox, request_forms, reviews
from access.services.applications import lock
from weights.models import Release

logger = logging.getLogger(__name__)

Outcome = PolicyRule.Outcome
Status = Application.Status
Action = ApplicationEvent.Action

# Not a valid username for sign-up (":" is refused), so no person can ever own it.
POLICY_ACTOR_USERNAME = "portal:approval-policy"


@dataclass(frozen=True)
class Decision:
    outcome: str  # a PolicyRule.Outcome value
    rule: PolicyRule | None  # None: no rule matched, or the release is reviewed manually
    explanation: str


@dataclass(frozen=True)
class LoadedPolicy:
    """A policy with its rules compiled, in order; `active` False means manual review."""

    policy: ApprovalPolicy | None
    rules: tuple[tuple[PolicyRule, tuple[Test, ...]], ...] = ()
    active: bool = False


MANUAL = LoadedPolicy(policy=None)


def policy_compile(
    policy: ApprovalPolicy, rules: Iterable[PolicyRule], *, release_slug: str, force: bool = False
) -> LoadedPolicy:
    """`force` compiles a manual-mode policy as if it were on (the dry run)."""
    compiled = tuple((rule, conditions_compile(rule.conditions, release_slug)) for rule in rules)
    return LoadedPolicy(
        policy=policy,
        rules=compiled,
        active=force or policy.mode == ApprovalPolicy.Mode.RULES,
    )


def _ordered_rules() -> Prefetch:
    return Prefetch("rules", queryset=PolicyRule.objects.order_by("position", "pk"))


def policies_load(releases: Iterable[Release]) -> dict[int, LoadedPolicy]:
    """Every release's policy, by release id, in two queries; MANUAL where there is none."""
    slugs = {release.pk: release.slug for release in releases}
    loaded = dict.fromkeys(slugs, MANUAL)
    for policy in ApprovalPolicy.objects.filter(release_id__in=slugs).prefetch_related(
        _ordered_rules()
    ):
        loaded[policy.release_id] = policy_compile(
            policy, policy.rules.all(), release_slug=slugs[policy.release_id]
        )
    return loaded


def policy_load(release: Release) -> LoadedPolicy:
    """The release's policy, loaded once per Release instance."""
    cached = getattr(release, "_approval_policy_loaded", None)
    if cached is None:
        cached = policies_load([release])[release.pk]
        release._approval_policy_loaded = cached
    return cached


def facts_for(application: Application) -> Facts:
    """What the policy may read about `application`; two queries, cached on the instance."""
    cached = getattr(application, "_policy_facts", None)
    if cached is None:
        cached = facts_load([application])[application.pk]
    return cached


def facts_load(applications: Sequence[Application]) -> dict[int, Facts]:
    """Facts for many applications: one query for the verified addresses of all of them, and
    the request-form answers of all of them."""
    verified: dict[int, set[str]] = {}
    rows = EmailAddress.objects.filter(
        user_id__in={application.applicant_id for application in applications}, verified=True
    ).values_list("user_id", "email")
    for user_id, email in rows:
        verified.setdefault(user_id, set()).add(email.casefold())
    answers = request_forms.answers_for_many(applications)
    loaded = {}
    for application in applications:
        facts = Facts(
            institutional_email=application.institutional_email,
            verified_emails=frozenset(verified.get(application.applicant_id, ())),
            orcid=application.orcid,
            country=str(application.country or ""),
            organisation_type=application.organisation_type,
            answers=answers.get(application.pk),
        )
        application._policy_facts = facts
        loaded[application.pk] = facts
    return loaded


def _label(policy: ApprovalPolicy | None, rule: PolicyRule | None) -> str:
    if policy is None:
        return "manual review"
    if rule is None:
        return f"policy {policy.name}: no rule matched"
    return f"policy {policy.name}: rule {rule.name}"


def decide(loaded: LoadedPolicy, facts: Facts) -> Decision:
    """The first rule whose conditions all hold decides; no match (or manual) holds."""
    if not loaded.active:
        return Decision(Outcome.HOLD.value, None, "manual review")
    for rule, tests in loaded.rules:
        if all(test(facts) for test in tests):
            return Decision(str(rule.outcome), rule, _label(loaded.policy, rule))
    return Decision(Outcome.HOLD.value, None, _label(loaded.policy, None))


def policy_evaluate(application: Application | Facts, release: Release) -> Decision:
    """What `release`'s policy decides for `application`; pure once both are loaded."""
    facts = application if isinstance(application, Facts) else facts_for(application)
    return decide(policy_load(release), facts)


# --- acting on the decisions -----------------------------------------------------------------


def policy_actor() -> AbstractBaseUser:
    """The service account that stands for every policy in user columns (grants, events)."""
    user, created = get_user_model().objects.get_or_create(
        username=POLICY_ACTOR_USERNAME, defaults={"is_active": False}
    )
    if created:
        user.set_unusable_password()
        user.save(update_fields=["password"])
    return user


def policies_enqueue(application_id: int) -> None:
    from access.tasks import apply_approval_policies

    outbox.enqueue(apply_approval_policies, application_id)


def policies_apply_after_commit(application_id: int) -> None:
    """Hook for application_submit and application_answer."""
    transaction.on_commit(partial(policies_enqueue, application_id))


@dataclass(frozen=True)
class _Verdicts:
    decisions: dict[Release, Decision]

    def labels(self, outcome: str) -> list[str]:
        return list(
            dict.fromkeys(d.explanation for d in self.decisions.values() if d.outcome == outcome)
        )

    def first_rule(self, outcome: str) -> PolicyRule | None:
        return next(
            (d.rule for d in self.decisions.values() if d.outcome == outcome and d.rule), None
        )

    def all(self, outcome: str) -> bool:
        return all(d.outcome == outcome for d in self.decisions.values())

    def any(self, outcome: str) -> bool:
        return any(d.outcome == outcome for d in self.decisions.values())


def policies_apply(application_id: int) -> str:
    """Apply each requested release's policy to a submitted application; returns what was done
    ("approved", "info_requested", "held", or "skipped" when nothing applies)."""
    with transaction.atomic():
        application = lock(application_id)
        if application.status != Status.SUBMITTED:
            return "skipped"  # a person (or an earlier run) acted first
        releases = list(application.requested_releases.order_by("sort_order", "name"))
        loaded = policies_load(releases)
        if not any(policy.active for policy in loaded.values()):
            return "skipped"  # manual releases: today's queue, untouched
        facts = facts_for(application)
        verdicts = _Verdicts(
            _no_second_question(
                application, {release: decide(loaded[release.pk], facts) for release in releases}
            )
        )
        try:
            if verdicts.all(Outcome.APPROVE):
                return _approve(application, verdicts)
            if verdicts.any(Outcome.REQUEST_INFO):
                return _request_info(application, verdicts)
        except errors.ServiceError:
            logger.warning(
                "policy decision on application %s refused", application_id, exc_info=True
            )
            return "skipped"
        return _hold(application, verdicts)


def _no_second_question(
    application: Application, decisions: dict[Release, Decision]
) -> dict[Release, Decision]:
    asked = set(
        application.events.filter(
            action=Action.INFO_REQUESTED, policy_rule__isnull=False
        ).values_list("policy_rule_id", flat=True)
    )
    return {
        release: (
            Decision(Outcome.HOLD.value, d.rule, d.explanation + " (question already answered)")
            if d.outcome == Outcome.REQUEST_INFO and d.rule is not None and d.rule.pk in asked
            else d
        )
        for release, d in decisions.items()
    }


def _decider(verdicts: _Verdicts, outcome: str) -> reviews.PolicyDecider:
    return reviews.PolicyDecider(
        rule=verdicts.first_rule(outcome),
        label="; ".join(verdicts.labels(outcome)),
        user=policy_actor(),
    )


def _approve(application: Application, verdicts: _Verdicts) -> str:
    decider = _decider(verdicts, Outcome.APPROVE)
    reviews.application_approve(
        application=application,
        reviewer=decider,
        releases=list(verdicts.decisions),
        note=f"Approved automatically by {decider.label}.",
    )
    return "approved"


def _request_info(application: Application, verdicts: _Verdicts) -> str:
    questions = list(
        dict.fromkeys(
            d.rule.question.strip()
            for d in verdicts.decisions.values()
            if d.outcome == Outcome.REQUEST_INFO and d.rule is not None
        )
    )
    reviews.application_request_info(
        application=application,
        reviewer=_decider(verdicts, Outcome.REQUEST_INFO),
        question="\n\n".join(questions),
    )
    return "info_requested"


_HOLD_VERB = {
    Outcome.APPROVE: "would be approved, waits with the rest",
    Outcome.HOLD: "held",
    Outcome.REQUEST_INFO: "question pending",
}


def _hold(application: Application, verdicts: _Verdicts) -> str:
    last = application.events.order_by("-created_at", "-pk").first()
    if last is not None and last.action == Action.HELD:
        return "held"  # this run happened already (a retried task)
    held_by = verdicts.labels(Outcome.HOLD)
    lines = [
        f"{release.name}: {_HOLD_VERB[d.outcome]} ({d.explanation})"
        for release, d in verdicts.decisions.items()
    ]
    ApplicationEvent.objects.create(
        application=application,
        actor=policy_actor(),
        policy_rule=verdicts.first_rule(Outcome.HOLD),
        actor_label="; ".join(held_by),
        action=Action.HELD,
        from_status=application.status,
        to_status=application.status,
        message="Held for a reviewer by " + "; ".join(held_by) + ".\n" + "\n".join(lines),
        releases=sorted(release.slug for release in verdicts.decisions),
    )
    return "held"


# --- dry run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DryRunRow:
    application_id: int
    rule: str  # "" when no rule matched
    policy_outcome: str
    human_outcome: str  # "approve" or "reject" (rejected, or this release not granted)

    @property
    def agrees(self) -> bool:
        # The policy agrees when it approves exactly what reviewers approved; a hold or a
        # question on what they rejected is agreement (a person would have decided it).
        return (self.policy_outcome == Outcome.APPROVE) == (self.human_outcome == "approve")


@dataclass(frozen=True)
class DryRunReport:
    release: str
    policy: str
    rows: list[DryRunRow] = field(default_factory=list)

    @property
    def disagreements(self) -> list[DryRunRow]:
        return [row for row in self.rows if not row.agrees]

    @property
    def agreement_rate(self) -> float | None:
        if not self.rows:
            return None
        return round((len(self.rows) - len(self.disagreements)) / len(self.rows), 4)

    def as_dict(self) -> dict[str, Any]:
        return {
            "release": self.release,
            "policy": self.policy,
            "evaluated": len(self.rows),
            "agreed": len(self.rows) - len(self.disagreements),
            "agreement_rate": self.agreement_rate,
            "would_approve_rejected": sum(
                1 for row in self.disagreements if row.policy_outcome == Outcome.APPROVE
            ),
            "disagreements": [
                {
                    "application_id": row.application_id,
                    "rule": row.rule,
                    "policy_outcome": row.policy_outcome,
                    "human_outcome": row.human_outcome,
                }
                for row in self.disagreements
            ],
        }


def policy_dry_run(release: Release, *, last: int = 100) -> DryRunReport:
    """What the policy (even in manual mode) would decide for the last `last` applications a
    reviewer decided for `release`, against what the reviewer decided."""
    policy = (
        ApprovalPolicy.objects.filter(release=release).prefetch_related(_ordered_rules()).first()
    )
    if policy is None:
        return DryRunReport(release=release.slug, policy="")
    loaded = policy_compile(policy, policy.rules.all(), release_slug=release.slug, force=True)
    decisions = (
        ApplicationEvent.objects.filter(
            application__requested_releases=release,
            action__in=(Action.APPROVED, Action.REJECTED),
            policy_rule__isnull=True,
            actor_label="",
        )
        .exclude(actor__username=POLICY_ACTOR_USERNAME)
        .select_related("application")
        .order_by("-created_at", "-pk")
    )
    # The latest decision a person made on each application, newest applications first.
    latest: dict[int, ApplicationEvent] = {}
    for event in decisions.iterator(chunk_size=500):
        latest.setdefault(event.application_id, event)
        if len(latest) >= last:
            break
    facts = facts_load([event.application for event in latest.values()])
    rows = []
    for application_id, event in latest.items():
        decision = decide(loaded, facts[application_id])
        approved = event.action == Action.APPROVED and release.slug in event.releases
        rows.append(
            DryRunRow(
                application_id=application_id,
                rule=decision.rule.name if decision.rule else "",
                policy_outcome=decision.outcome,
                human_outcome="approve" if approved else "reject",
            )
        )
    return DryRunReport(release=release.slug, policy=policy.name, rows=rows)


# --- throughput (python -m access.bench --only policy) ---------------------------------------


def _bench_policy() -> LoadedPolicy:
    policy = ApprovalPolicy(name="bench", mode=ApprovalPolicy.Mode.RULES)
    specs = [
        ("restricted country", [{"type": "country_in", "countries": ["KP", "IR", "SY"]}], "hold"),
        ("free mail", [{"type": "free_mail_domain"}], "hold"),
        (
            "institution with ORCID",
            [
                {"type": "email_verified"},
                {"type": "email_domain_in", "domains": ["ox.ac.uk", "mit.edu", "example.edu"]},
                {"type": "orcid_valid"},
            ],
            "approve",
        ),
        (
            "academic, says non-commercial",
            [
                {"type": "organisation_type_in", "types": ["academic", "government"]},
                {"type": "answer_equals", "key": "non_commercial", "value": True},
            ],
            "approve",
        ),
        (
            "industry",
            [
                {"type": "organisation_type_in", "types": ["industry_lab"]},
                {"type": "email_domain_not_in", "domains": ["example.com"]},
            ],
            "request_info",
        ),
    ]
    rules = [
        PolicyRule(policy=policy, position=i, name=name, conditions=conds, outcome=outcome)
        for i, (name, conds, outcome) in enumerate(specs)
    ]
    return policy_compile(policy, rules, release_slug="llama-7b")


def _bench_facts(n: int) -> list[Facts]:
    domains = ["ox.ac.uk", "cs.mit.edu", "gmail.com", "example.com", "uni.example.edu"]
    countries = ["GB", "US", "DE", "IR", "IN"]
    kinds = ["academic", "industry_lab", "government", "civil_society", "other"]
    orcids = ["0000-0002-1825-0097", "0000-0002-1825-0098", ""]
    facts = []
    for i in range(n):
        email = f"person{i}@{domains[i % 5]}"
        facts.append(
            Facts(
                institutional_email=email,
                verified_emails=frozenset({email}) if i % 4 else frozenset(),
                orcid=orcids[i % 3],
                country=countries[(i // 5) % 5],
                organisation_type=kinds[(i // 3) % 5],
                answers={"llama-7b": {"non_commercial": i % 2 == 0}},
            )
        )
    return facts


def policy_throughput(n: int = 10_000) -> dict[str, Any]:
    """Evaluate `n` in-memory applications against a five-rule policy; applications/s."""
    loaded = _bench_policy()
    facts = _bench_facts(n)
    outcomes: dict[str, int] = {}
    started = time.perf_counter()
    for item in facts:
        outcome = decide(loaded, item).outcome
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    seconds = time.perf_counter() - started
    return {
        "applications": n,
        "rules": len(loaded.rules),
        "seconds": round(seconds, 4),
        "applications_per_second": round(n / seconds) if seconds else None,
        "outcomes": outcomes,
    }
