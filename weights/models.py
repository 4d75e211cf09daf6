from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class Release(models.Model):
    """A downloadable model release (e.g. llama-7b) and its files."""

    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    family = models.CharField(max_length=64, default="llama")
    parameter_count = models.BigIntegerField(null=True, blank=True)
    license = models.ForeignKey(
        "access.LicenseVersion",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="releases",
        help_text="The license the release is distributed under (the current version applies to downloads).",
    )
    description = models.TextField(blank=True)
    published_at = models.DateTimeField(null=True, blank=True)
    revision = models.CharField(
        max_length=40,
        blank=True,
        help_text="Content hash of the release's files (40 hex): the Hub protocol's commit.",
    )
    sort_order = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    fingerprinted = models.BooleanField(
        default=False,
        help_text="Each grantee receives weights that are their own, traceable with "
        "manage.py trace_leak. Set before the first grant; it cannot be undone.",
    )
    # The secret from which marked positions and every grantee's code derive
    # (weights.fingerprint.keys). Never shown, never logged.
    fingerprint_key = models.BinaryField(max_length=32, null=True, blank=True, editable=False)

    class Meta:
        ordering = ["sort_order", "name"]

    def __str__(self) -> str:
        return self.name

    def is_published(self) -> bool:
        return self.published_at is not None


class Artifact(models.Model):
    """One file of a release: `path` is what researchers see, `storage_key` where the bytes live.

    A release holds Meta's original layout and, when its checkpoint loads, a Hugging Face
    transformers variant converted from it; `path` is relative to its variant."""

    class Variant(models.TextChoices):
        ORIGINAL = "original", "Original (Meta layout)"
        TRANSFORMERS = "transformers", "Hugging Face transformers"

    release = models.ForeignKey(Release, on_delete=models.CASCADE, related_name="artifacts")
    variant = models.CharField(max_length=20, choices=Variant.choices, default=Variant.ORIGINAL)
    path = models.CharField(max_length=500)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    md5 = models.CharField(max_length=32)
    storage_key = models.CharField(max_length=600)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["release", "variant", "path"]
        constraints = [
            models.UniqueConstraint(
                fields=["release", "variant", "path"], name="one_artifact_per_variant_path"
            )
        ]

    def __str__(self) -> str:
        return f"{self.release.slug}/{self.repo_path}"

    @property
    def repo_path(self) -> str:
        """Its path in the Hub layout: transformers files at the top, Meta's under original/."""
        if self.variant == self.Variant.TRANSFORMERS:
            return self.path
        return f"original/{self.path}"


class DownloadLink(models.Model):
    """A bearer link for one grant. Only the SHA-256 of its token is stored."""

    grant = models.ForeignKey(
        "access.Grant", on_delete=models.CASCADE, related_name="download_links"
    )
    token_hash = models.CharField(max_length=64, unique=True)
    token_hint = models.CharField(
        max_length=8, help_text="First characters of the token, to tell links apart."
    )
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    budget_copies = models.PositiveIntegerField(
        help_text="Full copies of each file this link may fetch."
    )
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    revoke_reason = models.CharField(max_length=300, blank=True)
    flagged_at = models.DateTimeField(
        null=True, blank=True, help_text="Used from too many IP addresses."
    )
    emailed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["grant"],
                condition=Q(revoked_at__isnull=True),
                name="one_live_link_per_grant",
            )
        ]

    def __str__(self) -> str:
        return f"link {self.token_hint}… for {self.grant}"

    def is_expired(self, now=None) -> bool:
        return (now or timezone.now()) >= self.expires_at

    def is_revoked(self) -> bool:
        return self.revoked_at is not None


class LinkUsage(models.Model):
    """Bytes charged to a link for one file; the budget is budget_copies × file size."""

    link = models.ForeignKey(DownloadLink, on_delete=models.CASCADE, related_name="usages")
    artifact = models.ForeignKey(Artifact, on_delete=models.CASCADE, related_name="+")
    bytes_charged = models.BigIntegerField(default=0)
    bytes_forgiven = models.BigIntegerField(
        default=0, help_text="Bytes re-requested by an address that had already paid for them."
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["link", "artifact"], name="one_usage_per_link_file")
        ]

    def __str__(self) -> str:
        return f"{self.bytes_charged} B of {self.artifact} on {self.link}"


class DownloadEvent(models.Model):
    """One file request and what it got. Only SERVED, PARTIAL and REDIRECTED deliver bytes."""

    class Outcome(models.TextChoices):
        SERVED = "served", "Served"
        PARTIAL = "partial", "Partially served (client stopped)"
        REDIRECTED = "redirected", "Redirected to storage"
        NOT_MODIFIED = "not_modified", "Not modified"
        HEAD = "head", "Headers only (HEAD)"
        EXPIRED = "expired", "Link expired"
        REVOKED = "revoked", "Link or grant revoked"
        LICENSE = "license", "License must be re-accepted"
        BUDGET = "budget", "Budget spent"
        BAD_RANGE = "bad_range", "Unsatisfiable range"
        NOT_FOUND = "not_found", "No such file"
        UNAVAILABLE = "unavailable", "Storage unavailable"
        INVALID = "invalid", "Invalid token"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, null=True, related_name="+"
    )
    link = models.ForeignKey(
        DownloadLink, on_delete=models.CASCADE, null=True, related_name="events"
    )
    artifact = models.ForeignKey(
        Artifact, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    ip_address = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=300, blank=True)
    range_header = models.CharField(max_length=200, blank=True)
    bytes = models.BigIntegerField(default=0)
    status_code = models.PositiveSmallIntegerField()
    outcome = models.CharField(max_length=20, choices=Outcome.choices)
    journal_id = models.UUIDField(
        null=True, blank=True, unique=True, editable=False, help_text="Journal line it came from."
    )

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.get_outcome_display()} {self.bytes} B"


class RecipientCopy(models.Model):
    """A grantee's own copy of one file of a fingerprinted release: its checksums.

    The bytes are computed on the fly from the original (weights.fingerprint), so only
    what the grantee's tools check is stored: SHA-256 and MD5, computed once by a task
    before the link is emailed. ``storage_key`` is set when the copy was also written out
    (S3, where the portal redirects instead of streaming)."""

    class State(models.TextChoices):
        READY = "ready", "Ready"
        FAILED = "failed", "Failed"

    grant = models.ForeignKey(
        "access.Grant", on_delete=models.CASCADE, related_name="recipient_copies"
    )
    artifact = models.ForeignKey(Artifact, on_delete=models.CASCADE, related_name="+")
    sha256 = models.CharField(max_length=64, blank=True)
    md5 = models.CharField(max_length=32, blank=True)
    storage_key = models.CharField(max_length=600, blank=True)
    state = models.CharField(max_length=10, choices=State.choices)
    error = models.TextField(blank=True)
    prepared_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["grant", "artifact"], name="one_copy_per_grant_file")
        ]

    def __str__(self) -> str:
        return f"{self.artifact} for grant {self.grant_id} ({self.state})"
