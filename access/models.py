from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from uuid import uuid4

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.db.models.functions import Lower
from django.utils import timezone
from django_countries.fields import CountryField
from knox.models import AbstractAuthToken

from access.policy_conditions import conditions_help, validate_conditions
from access.validators import (
    NoInvisibleCharacters,
    validate_intended_use_length,
    validate_orcid,
    validate_scholar_url,
)
from access.webhook_validators import validate_webhook_url


class LicenseVersion(models.Model):
    name = models.CharField(max_length=200)
    version = models.CharField(max_length=32, unique=True)
    text = models.TextField()
    text_sha256 = models.CharField(max_length=64, editable=False)
    effective_from = models.DateTimeField(default=timezone.now)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-effective_from"]

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"

    @staticmethod
    def digest(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


class LicenseAcceptance(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="license_acceptances"
    )
    license_version = models.ForeignKey(
        LicenseVersion, on_delete=models.PROTECT, related_name="acceptances"
    )
    accepted_at = models.DateTimeField(default=timezone.now)
    ip_address = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=300, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["user", "license_version"], name="one_acceptance_per_version"
            )
        ]

    def __str__(self) -> str:
        return f"{self.user} accepted {self.license_version}"


class OrganisationType(models.TextChoices):
    ACADEMIC = "academic", "Academic"
    GOVERNMENT = "government", "Government"
    CIVIL_SOCIETY = "civil_society", "Civil society"
    INDUSTRY_LAB = "industry_lab", "Industry research lab"
    OTHER = "other", "Other"


class Application(models.Model):
    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        SUBMITTED = "submitted", "Submitted"
        INFO_REQUESTED = "info_requested", "More information requested"
        APPROVED = "approved", "Approved"
        REJECTED = "rejected", "Rejected"
        WITHDRAWN = "withdrawn", "Withdrawn"
        REVOKED = "revoked", "Revoked"

    OPEN_STATUSES = (Status.DRAFT, Status.SUBMITTED, Status.INFO_REQUESTED)
    AWAITING_REVIEW = (Status.SUBMITTED,)

    applicant = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="applications"
    )
    status = models.CharField(
        max_length=20, choices=Status.choices, default=Status.DRAFT, db_index=True
    )
    full_name = models.CharField(
        max_length=200, blank=True, validators=[NoInvisibleCharacters("Full name")]
    )
    institutional_email = models.EmailField(
        blank=True, validators=[NoInvisibleCharacters("Institutional email")]
    )
    affiliation = models.CharField(
        max_length=200, blank=True, validators=[NoInvisibleCharacters("Affiliation")]
    )
    organisation_type = models.CharField(
        max_length=20, choices=OrganisationType.choices, blank=True
    )
    country = CountryField(blank=True)
    role = models.CharField(
        "role or position",
        max_length=200,
        blank=True,
        validators=[NoInvisibleCharacters("Role or position")],
    )
    orcid = models.CharField("ORCID iD", max_length=19, blank=True, validators=[validate_orcid])
    scholar_url = models.URLField(
        "Google Scholar profile",
        blank=True,
        validators=[validate_scholar_url, NoInvisibleCharacters("Google Scholar profile")],
    )
    homepage_url = models.URLField(
        "homepage", blank=True, validators=[NoInvisibleCharacters("Homepage")]
    )
    publications = models.TextField(
        "other publication or profile links",
        blank=True,
        max_length=2000,
        validators=[NoInvisibleCharacters("Publication links", multiline=True)],
    )
    intended_use = models.TextField(
        "intended research use",
        blank=True,
        validators=[
            validate_intended_use_length,
            NoInvisibleCharacters("Intended research use", multiline=True),
        ],
    )
    requested_releases = models.ManyToManyField(
        "weights.Release", related_name="applications", blank=True
    )
    license_acceptance = models.ForeignKey(
        LicenseAcceptance,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="applications",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    submitted_at = models.DateTimeField(null=True, blank=True, db_index=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    # Working the queue as a team (access.services.claims): who holds it, since when.
    claimed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    claimed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["submitted_at", "created_at"]
        indexes = [
            # The queue: a status filter, oldest first.
            models.Index(fields=["status", "submitted_at", "id"], name="application_queue_idx"),
            models.Index(fields=["country"], name="application_country_idx"),
            # Batched screening flags look up duplicates by lower-cased email and name.
            models.Index(Lower("institutional_email"), name="application_email_lower_idx"),
            models.Index(Lower("full_name"), name="application_name_lower_idx"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["applicant"],
                condition=Q(status__in=["draft", "submitted", "info_requested"]),
                name="one_open_application_per_applicant",
            )
        ]
        permissions = [
            ("decide_application", "Can approve, reject, question and revoke applications")
        ]

    def __str__(self) -> str:
        return f"Application #{self.pk} by {self.full_name or self.applicant}"

    def is_open(self) -> bool:
        return self.status in self.OPEN_STATUSES

    def is_editable(self) -> bool:
        return self.status == self.Status.DRAFT

    def is_approved(self) -> bool:
        return self.status == self.Status.APPROVED


class AppendOnlyModel(models.Model):
    """Decision records are evidence: once written they are never changed or deleted."""

    class Meta:
        abstract = True

    def save(self, *args, **kwargs):  # noqa: DJ012
        if self.pk is not None and not self._state.adding:
            raise ValueError(f"{type(self).__name__} rows are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ValueError(f"{type(self).__name__} rows are append-only")


class ApplicationEvent(AppendOnlyModel):
    class Action(models.TextChoices):
        CREATED = "created", "Draft created"
        SUBMITTED = "submitted", "Submitted"
        INFO_REQUESTED = "info_requested", "More information requested"
        ANSWERED = "answered", "Answered"
        APPROVED = "approved", "Approved"
        REJECTED = "rejected", "Rejected"
        WITHDRAWN = "withdrawn", "Withdrawn"
        REVOKED = "revoked", "Approval revoked"
        HELD = "held", "Held for review"  # an approval policy left it for a person

    DECISIONS = (Action.APPROVED, Action.REJECTED, Action.INFO_REQUESTED, Action.REVOKED)

    application = models.ForeignKey(Application, on_delete=models.PROTECT, related_name="events")
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    action = models.CharField(max_length=20, choices=Action.choices)
    message = models.TextField(blank=True)
    releases = models.JSONField(default=list, blank=True)
    from_status = models.CharField(max_length=20, choices=Application.Status.choices, blank=True)
    to_status = models.CharField(max_length=20, choices=Application.Status.choices)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    # Set when an approval policy decided: `actor` is then the policy's service account and
    # `actor_label` names policy and rule, kept even after the rule is edited or deleted.
    policy_rule = models.ForeignKey(
        "access.PolicyRule", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    actor_label = models.CharField(max_length=400, blank=True)

    class Meta:
        ordering = ["created_at", "pk"]

    def __str__(self) -> str:
        return f"{self.get_action_display()} by {self.actor} at {self.created_at:%Y-%m-%d %H:%M}"


class Grant(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="grants"
    )
    release = models.ForeignKey("weights.Release", on_delete=models.PROTECT, related_name="grants")
    # Null for a direct grant, given by a reviewer without an application
    # (access.services.direct_grants; its reason is in GrantEvent).
    application = models.ForeignKey(
        Application, on_delete=models.PROTECT, null=True, blank=True, related_name="grants"
    )
    license_version = models.ForeignKey(
        LicenseVersion, on_delete=models.PROTECT, related_name="grants"
    )
    granted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    revoke_reason = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["user", "release"],
                condition=Q(revoked_at__isnull=True),
                name="one_active_grant_per_release",
            )
        ]

    def __str__(self) -> str:
        return f"{self.user} → {self.release}"

    def is_active(self) -> bool:
        return self.revoked_at is None


class Notification(models.Model):
    """Outbox row: written in the transaction that causes it, delivered after commit."""

    kind = models.CharField(max_length=50)
    recipient = models.EmailField()
    context = models.JSONField(default=dict)
    dedupe_key = models.CharField(max_length=200, unique=True, null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    # Set when the row can never be delivered (a permanent error, or retries exhausted);
    # the sweep skips it and operators see it in the admin and in portal_stats.
    failed_at = models.DateTimeField(null=True, blank=True, db_index=True)

    class Meta:
        ordering = ["created_at"]

    def __str__(self) -> str:
        return f"{self.kind} to {self.recipient}"

    def is_sent(self) -> bool:
        return self.sent_at is not None

    def is_failed(self) -> bool:
        return self.failed_at is not None


class ApiToken(AbstractAuthToken):
    """A personal API token (django-rest-knox): only a digest is stored, shown once.

    `second_factor` says the token was minted from a session that passed TOTP; only such
    tokens may act as a reviewer. `password_stamp` ties the token to the password it was
    minted under: any password change, on any door, ends every token.
    """

    name = models.CharField(max_length=100)
    second_factor = models.BooleanField(default=False)
    password_stamp = models.CharField(max_length=128, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.name} ({self.token_key}…) of {self.user}"


# --- Webhooks (access.services.webhooks, docs/webhooks.md) --------------------------------


class WebhookEventType(models.TextChoices):
    APPLICATION_SUBMITTED = "application.submitted", "Application submitted"
    APPLICATION_ANSWERED = "application.answered", "Applicant answered a question"
    APPLICATION_APPROVED = "application.approved", "Application approved"
    APPLICATION_REJECTED = "application.rejected", "Application rejected"
    APPLICATION_WITHDRAWN = "application.withdrawn", "Application withdrawn"
    APPLICATION_REVOKED = "application.revoked", "Approval revoked"
    GRANT_REVOKED = "grant.revoked", "Grant revoked"
    LINK_FLAGGED = "link.flagged", "Download link flagged (used from many addresses)"


# The test event an operator sends from the admin; endpoints cannot subscribe to it.
WEBHOOK_PING = "ping"


def validate_event_types(value: object) -> None:
    known = set(WebhookEventType.values)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValidationError("Event types must be a list of event type names.")
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValidationError(f"Unknown event types: {', '.join(unknown)}.")


def new_webhook_secret() -> str:
    # The prefix lets secret scanners recognise a leaked one.
    return "whsec_" + secrets.token_urlsafe(32)


class WebhookEndpoint(models.Model):
    """Where an operator wants events POSTed, signed with this endpoint's own secret."""

    url = models.URLField("URL", max_length=2000, validators=[validate_webhook_url])
    description = models.CharField(
        max_length=200, blank=True, validators=[NoInvisibleCharacters("Description")]
    )
    event_types = models.JSONField(default=list, validators=[validate_event_types])
    is_active = models.BooleanField("active", default=True)
    secret = models.CharField(max_length=100, default=new_webhook_secret, editable=False)
    # After a rotation, requests are signed with both secrets until this expires, so that
    # a receiver can switch to the new one without refusing events meanwhile.
    previous_secret = models.CharField(max_length=100, blank=True, editable=False)
    previous_secret_expires_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["pk"]

    def __str__(self) -> str:
        return self.description or self.url

    def subscribes_to(self, event_type: str) -> bool:
        return event_type in self.event_types

    def previous_secret_at(self, now: datetime) -> str:
        """The rotated-out secret while its grace period lasts, else ""."""
        expires = self.previous_secret_expires_at
        return self.previous_secret if expires is not None and now < expires else ""


class WebhookDelivery(models.Model):
    """Outbox row: one event for one endpoint, written in the transaction that causes it."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        DELIVERED = "delivered", "Delivered"
        FAILED = "failed", "Failed"

    endpoint = models.ForeignKey(
        WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries"
    )
    # The payload's "id" and the X-Portal-Delivery header: receivers deduplicate on it.
    uuid = models.UUIDField(default=uuid4, unique=True, editable=False)
    event_type = models.CharField(max_length=50)
    data = models.JSONField(default=dict)
    dedupe_key = models.CharField(max_length=200, null=True, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    claimed_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    delivered_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    last_response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        verbose_name_plural = "webhook deliveries"
        indexes = [models.Index(fields=["status", "next_attempt_at"], name="webhook_due_idx")]
        constraints = [
            models.UniqueConstraint(
                fields=["endpoint", "dedupe_key"],
                condition=Q(dedupe_key__isnull=False),
                name="one_webhook_delivery_per_dedupe_key",
            )
        ]

    def __str__(self) -> str:
        return f"{self.event_type} to {self.endpoint} ({self.get_status_display().lower()})"


class WebhookAttempt(models.Model):
    """One POST of a delivery and what came back: the delivery log."""

    delivery = models.ForeignKey(
        WebhookDelivery, on_delete=models.CASCADE, related_name="attempt_log"
    )
    number = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    duration_ms = models.PositiveIntegerField()
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    response_body = models.TextField(blank=True, help_text="The start of the response body.")
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["delivery", "number"]
        constraints = [
            models.UniqueConstraint(
                fields=["delivery", "number"], name="one_webhook_attempt_per_number"
            )
        ]

    def __str__(self) -> str:
        outcome = self.response_status or self.error.partition(":")[0] or "no answer"
        return f"attempt {self.number} of {self.delivery.uuid}: {outcome}"


# --- Per-release request forms (access.services.request_forms) ---------------------------


class QuestionKind(models.TextChoices):
    TEXT = "text", "Text (one line)"
    LONG_TEXT = "long_text", "Long text"
    CHECKBOX = "checkbox", "Checkbox"
    SELECT = "select", "Select (one of the options)"
    DATE = "date", "Date"
    COUNTRY = "country", "Country"
    URL = "url", "URL"


class RequestForm(models.Model):
    """One version of a release's extra questions; the highest version is the current one.

    A version that has answers is never edited: changing its questions makes the next
    version, so that every answer keeps the question it answered.
    """

    release = models.ForeignKey(
        "weights.Release", on_delete=models.PROTECT, related_name="request_forms"
    )
    version = models.PositiveIntegerField(editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["release", "-version"]
        constraints = [
            models.UniqueConstraint(
                fields=["release", "version"], name="one_request_form_per_release_version"
            )
        ]

    def __str__(self) -> str:
        return f"{self.release} request form v{self.version}"


class RequestQuestion(models.Model):
    form = models.ForeignKey(RequestForm, on_delete=models.CASCADE, related_name="questions")
    key = models.SlugField(
        max_length=50, help_text="Stable name for the API and the export, e.g. lab_website."
    )
    kind = models.CharField(max_length=20, choices=QuestionKind.choices)
    label = models.CharField(max_length=200, validators=[NoInvisibleCharacters("Label")])
    help_text = models.TextField(
        max_length=1000, blank=True, validators=[NoInvisibleCharacters("Help text", multiline=True)]
    )
    required = models.BooleanField(default=False)
    options = models.JSONField(default=list, blank=True, help_text="For select: the choices.")
    order = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["form", "order", "pk"]
        constraints = [
            models.UniqueConstraint(fields=["form", "key"], name="one_request_question_per_key")
        ]

    def __str__(self) -> str:
        return f"{self.label} ({self.key})"


class RequestAnswer(models.Model):
    """An applicant's answer to one question of the form version they answered."""

    application = models.ForeignKey(
        Application, on_delete=models.CASCADE, related_name="request_answers"
    )
    question = models.ForeignKey(RequestQuestion, on_delete=models.PROTECT, related_name="answers")
    # A string for every kind (dates as YYYY-MM-DD, countries as ISO codes), true for a
    # ticked checkbox.
    value = models.JSONField()
    answered_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["application", "question__order", "question__pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["application", "question"], name="one_request_answer_per_question"
            )
        ]

    def __str__(self) -> str:
        return f"{self.question.key} of application #{self.application_id}"


# --- Direct grants and per-release revocation (access.services.direct_grants) -------------


class GrantEvent(AppendOnlyModel):
    """Who gave or took one grant, and why: the audit trail of grants given without an
    application and of grants revoked one by one. A decision on a whole application is an
    ApplicationEvent instead."""

    class Action(models.TextChoices):
        GRANTED = "granted", "Granted directly"
        REVOKED = "revoked", "Revoked"

    grant = models.ForeignKey(Grant, on_delete=models.PROTECT, related_name="events")
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    action = models.CharField(max_length=20, choices=Action.choices)
    reason = models.TextField()
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["created_at", "pk"]

    def __str__(self) -> str:
        return f"{self.get_action_display()} by {self.actor} at {self.created_at:%Y-%m-%d %H:%M}"


# --- Reviewer dashboard (access.admin_dashboard) -------------------------------------------


class ReviewDashboard(Application):
    """No table of its own: gives the admin a URL (/admin/access/reviewdashboard/) and an
    entry on the admin index for the reviewer dashboard."""

    class Meta:
        proxy = True
        verbose_name = verbose_name_plural = "review dashboard"


# --- Approval policies (access.services.approval_policies) ---------------------------------


class ApprovalPolicy(models.Model):
    """How a release's applications are decided: by a person (manual) or by ordered rules."""

    class Mode(models.TextChoices):
        MANUAL = "manual", "Manual: every application waits for a reviewer"
        RULES = "rules", "Rules: the first matching rule decides, else a reviewer"

    release = models.OneToOneField(
        "weights.Release", on_delete=models.CASCADE, related_name="approval_policy"
    )
    name = models.CharField(max_length=200, validators=[NoInvisibleCharacters("Name")])
    mode = models.CharField(max_length=10, choices=Mode.choices, default=Mode.MANUAL)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["release"]
        verbose_name_plural = "approval policies"

    def __str__(self) -> str:
        return self.name


class PolicyRule(models.Model):
    class Outcome(models.TextChoices):
        APPROVE = "approve", "Approve"
        HOLD = "hold", "Hold for a reviewer"
        REQUEST_INFO = "request_info", "Request information"

    policy = models.ForeignKey(ApprovalPolicy, on_delete=models.CASCADE, related_name="rules")
    position = models.PositiveIntegerField(default=0, help_text="Rules are tried in this order.")
    name = models.CharField(max_length=200, validators=[NoInvisibleCharacters("Name")])
    conditions = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_conditions],
        help_text=(
            'A list of conditions that must all hold, e.g. [{"type": "email_domain_in", '
            '"domains": ["ox.ac.uk"]}, {"type": "orcid_valid"}]; [] matches every application. '
            "Types: " + conditions_help() + "."
        ),
    )
    outcome = models.CharField(max_length=20, choices=Outcome.choices)
    question = models.TextField(
        blank=True, help_text="The stock question sent to the applicant (request information)."
    )

    class Meta:
        ordering = ["policy", "position", "pk"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if self.outcome == self.Outcome.REQUEST_INFO and not self.question.strip():
            raise ValidationError(
                {"question": "A rule that requests information needs a question."}
            )
