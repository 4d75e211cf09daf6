"""Bulk-created, realistic applications for benchmarks and demos (`manage.py seed_applications`).

Rows are written with bulk_create in batches, one transaction per batch, without the
services: no emails, no webhooks, no download links. What is written is what the services
would leave behind: a user with a verified address (most of them), a license acceptance,
the application with its requested releases, its timeline (created, submitted, and for the
decided ones approved or rejected by a seed reviewer) and the grants of the approved ones.
About one applicant in fifty reuses another's name and one in a hundred another's email, so
the screening flags have duplicates to find.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from allauth.account.models import EmailAddress
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.db import transaction
from django.utils import timezone
from faker import Faker

from access.models import (
    Application,
    ApplicationEvent,
    Grant,
    LicenseAcceptance,
    LicenseVersion,
    OrganisationType,
)
from access.services.licenses import license_current, license_publish
from access.services.reviewers import reviewers_group_ensure
from weights.models import Release

Status, Action = Application.Status, ApplicationEvent.Action

INSTITUTIONS = [
    ("University of Oxford", "ox.ac.uk", "GB", OrganisationType.ACADEMIC),
    ("University of Cambridge", "cam.ac.uk", "GB", OrganisationType.ACADEMIC),
    ("Massachusetts Institute of Technology", "mit.edu", "US", OrganisationType.ACADEMIC),
    ("Stanford University", "stanford.edu", "US", OrganisationType.ACADEMIC),
    ("Carnegie Mellon University", "cmu.edu", "US", OrganisationType.ACADEMIC),
    ("ETH Zürich", "ethz.ch", "CH", OrganisationType.ACADEMIC),
    ("EPFL", "epfl.ch", "CH", OrganisationType.ACADEMIC),
    ("Inria", "inria.fr", "FR", OrganisationType.GOVERNMENT),
    ("Max Planck Institute for Informatics", "mpi-inf.mpg.de", "DE", OrganisationType.ACADEMIC),
    ("Technical University of Munich", "tum.de", "DE", OrganisationType.ACADEMIC),
    ("University of Tokyo", "u-tokyo.ac.jp", "JP", OrganisationType.ACADEMIC),
    ("Tsinghua University", "tsinghua.edu.cn", "CN", OrganisationType.ACADEMIC),
    ("KAIST", "kaist.ac.kr", "KR", OrganisationType.ACADEMIC),
    ("Indian Institute of Science", "iisc.ac.in", "IN", OrganisationType.ACADEMIC),
    ("University of São Paulo", "usp.br", "BR", OrganisationType.ACADEMIC),
    ("University of Cape Town", "uct.ac.za", "ZA", OrganisationType.ACADEMIC),
    ("Australian National University", "anu.edu.au", "AU", OrganisationType.ACADEMIC),
    ("University of Toronto", "utoronto.ca", "CA", OrganisationType.ACADEMIC),
    ("National Physical Laboratory", "npl.co.uk", "GB", OrganisationType.GOVERNMENT),
    ("Allen Institute for AI", "allenai.org", "US", OrganisationType.CIVIL_SOCIETY),
    ("AlgorithmWatch", "algorithmwatch.org", "DE", OrganisationType.CIVIL_SOCIETY),
    ("Example Research Lab", "research.example.com", "US", OrganisationType.INDUSTRY_LAB),
    ("Nordic Language Lab", "nll.example.se", "SE", OrganisationType.INDUSTRY_LAB),
]
FREE_MAIL = ["gmail.com", "outlook.com", "yahoo.com", "proton.me", "qq.com", "163.com"]
FREE_MAIL_COUNTRIES = ["US", "IN", "CN", "BR", "NG", "PK", "ID", "RU", "IR", "VN", "EG", "MX"]
ROLES = [
    "PhD student",
    "Postdoctoral researcher",
    "Research scientist",
    "Assistant professor",
    "Professor",
    "Research engineer",
    "Master's student",
    "Independent researcher",
]
USES = [
    "Studying calibration of large language models on reasoning benchmarks.",
    "Evaluating factual recall and hallucination rates for a survey paper.",
    "Measuring bias in generated text across demographic groups.",
    "Fine-tuning for low-resource machine translation ({lang}).",
    "Interpretability research: probing attention heads for syntax.",
    "Comparing quantisation methods for on-device inference.",
    "Red-teaming for a safety evaluation benchmark.",
    "Teaching a graduate course on language models.",
]
LANGUAGES = ["Yoruba", "Welsh", "Quechua", "Amharic", "Basque", "Khmer", "Sinhala"]
REJECTION = "We could not confirm an academic or research affiliation."


@dataclass(frozen=True)
class SeedResult:
    applications: int
    decided: int
    grants: int
    seconds: float


def _ensure_releases(slugs: Sequence[str]) -> list[Release]:
    if slugs:
        found = {r.slug: r for r in Release.objects.filter(slug__in=slugs)}
        missing = [slug for slug in slugs if slug not in found]
        if missing:
            raise ValueError(f"unknown releases: {', '.join(missing)}")
        return [found[slug] for slug in slugs]
    existing = list(Release.objects.order_by("sort_order", "name"))
    if existing:
        return existing
    return [
        Release.objects.create(slug=slug, name=name, sort_order=i)
        for i, (slug, name) in enumerate([("llama-7b", "LLaMA 7B"), ("llama-13b", "LLaMA 13B")])
    ]


def _ensure_license() -> LicenseVersion:
    return license_current() or license_publish(
        name="LLaMA Noncommercial Research License",
        version="seed-1",
        text="LLaMA research license (seed). Noncommercial use only.",
        effective_from=timezone.now() - timedelta(days=365),
    )


def _ensure_reviewer():
    user_model = get_user_model()
    reviewer, _ = user_model.objects.get_or_create(
        username="seed-reviewer",
        defaults={"email": "seed-reviewer@portal.example.org", "is_staff": True},
    )
    reviewer.groups.add(reviewers_group_ensure())
    return reviewer


def seed_applications(
    count: int,
    *,
    releases: Sequence[str] = (),
    decided_fraction: float = 0.3,
    seed: int | None = None,
    batch_size: int = 2000,
    progress: Callable[[int], None] | None = None,
) -> SeedResult:
    """Write `count` submitted or decided applications (and their users) in batches."""
    if not 0 <= decided_fraction <= 1:
        raise ValueError("decided_fraction must be between 0 and 1")
    started = timezone.now()
    rng = random.Random(seed)
    fake = Faker()
    fake.seed_instance(seed if seed is not None else rng.randrange(2**31))
    chosen = _ensure_releases(releases)
    license_version = _ensure_license()
    reviewer = _ensure_reviewer()
    run = secrets.token_hex(3)  # so that two runs never collide on usernames or emails
    unusable = make_password(None)  # seeded users cannot sign in; hashing each would cost hours
    names: list[str] = []
    emails: list[str] = []
    decided = grants = 0
    for start in range(0, count, batch_size):
        size = min(batch_size, count - start)
        with transaction.atomic():
            made = _seed_batch(
                start, size, run, rng, fake, chosen, license_version, reviewer, unusable,
                decided_fraction, names, emails,
            )  # fmt: skip
        decided += made[0]
        grants += made[1]
        if progress:
            progress(start + size)
    seconds = (timezone.now() - started).total_seconds()
    return SeedResult(count, decided, grants, seconds)


def _seed_batch(
    start, size, run, rng, fake, releases, license_version, reviewer, unusable,
    decided_fraction, names, emails,
) -> tuple[int, int]:  # fmt: skip
    user_model = get_user_model()
    now = timezone.now()
    people = []
    for i in range(start, start + size):
        name = rng.choice(names) if names and rng.random() < 0.02 else fake.name()
        local = "".join(c for c in name.lower().replace(" ", ".") if c.isalnum() or c == ".")
        if rng.random() < 0.35:
            domain = rng.choice(FREE_MAIL)
            affiliation, country = "Independent", rng.choice(FREE_MAIL_COUNTRIES)
            organisation_type = OrganisationType.OTHER
        else:
            affiliation, domain, country, organisation_type = rng.choice(INSTITUTIONS)
        email = f"{local}.{run}{i}@{domain}"
        institutional = rng.choice(emails) if emails and rng.random() < 0.01 else email
        names.append(name)
        emails.append(email)
        people.append((name, email, institutional, affiliation, country, organisation_type))
    users = user_model.objects.bulk_create(
        [
            user_model(username=f"seed-{run}-{start + k}", email=p[1], password=unusable)
            for k, p in enumerate(people)
        ]
    )
    EmailAddress.objects.bulk_create(
        [
            EmailAddress(user=user, email=user.email, verified=rng.random() < 0.9, primary=True)
            for user in users
        ]
    )
    acceptances = LicenseAcceptance.objects.bulk_create(
        [
            LicenseAcceptance(
                user=user, license_version=license_version, accepted_at=now, ip_address="127.0.0.1"
            )
            for user in users
        ]
    )
    rows = []
    for user, acceptance, (name, _, institutional, affiliation, country, org) in zip(
        users, acceptances, people, strict=True
    ):
        submitted = now - timedelta(seconds=rng.randrange(1, 60 * 24 * 3600))
        roll = rng.random()
        if roll < decided_fraction:
            status = Status.APPROVED if rng.random() < 0.8 else Status.REJECTED
        else:
            status = Status.INFO_REQUESTED if rng.random() < 0.05 else Status.SUBMITTED
        decided_at = (
            submitted + timedelta(hours=rng.randrange(1, 96))
            if status in (Status.APPROVED, Status.REJECTED)
            else None
        )
        rows.append(
            Application(
                applicant=user,
                status=status,
                full_name=name,
                institutional_email=institutional,
                affiliation=affiliation,
                organisation_type=org,
                country=country,
                role=rng.choice(ROLES),
                intended_use=rng.choice(USES).format(lang=rng.choice(LANGUAGES)),
                license_acceptance=acceptance,
                submitted_at=submitted,
                decided_at=decided_at,
            )
        )
    applications = Application.objects.bulk_create(rows)
    through = Application.requested_releases.through
    wanted = {a.pk: rng.sample(releases, rng.randint(1, len(releases))) for a in applications}
    through.objects.bulk_create(
        [
            through(application_id=pk, release_id=release.pk)
            for pk, chosen in wanted.items()
            for release in chosen
        ]
    )
    events, new_grants = [], []
    for a in applications:
        slugs = sorted(r.slug for r in wanted[a.pk])
        events.append(
            ApplicationEvent(
                application=a,
                actor=a.applicant,
                action=Action.CREATED,
                to_status=Status.DRAFT,
                created_at=a.submitted_at - timedelta(minutes=rng.randrange(5, 600)),
            )
        )
        events.append(
            ApplicationEvent(
                application=a,
                actor=a.applicant,
                action=Action.SUBMITTED,
                from_status=Status.DRAFT,
                to_status=Status.SUBMITTED,
                releases=slugs,
                created_at=a.submitted_at,
            )
        )
        if a.status == Status.INFO_REQUESTED:
            events.append(
                ApplicationEvent(
                    application=a,
                    actor=reviewer,
                    action=Action.INFO_REQUESTED,
                    from_status=Status.SUBMITTED,
                    to_status=Status.INFO_REQUESTED,
                    message="Which project will you use the weights for?",
                    created_at=a.submitted_at + timedelta(hours=2),
                )
            )
        elif a.decided_at is not None:
            approved = a.status == Status.APPROVED
            events.append(
                ApplicationEvent(
                    application=a,
                    actor=reviewer,
                    action=Action.APPROVED if approved else Action.REJECTED,
                    from_status=Status.SUBMITTED,
                    to_status=a.status,
                    message="" if approved else REJECTION,
                    releases=slugs if approved else [],
                    created_at=a.decided_at,
                )
            )
            if approved:
                new_grants += [
                    Grant(
                        user_id=a.applicant_id,
                        release=release,
                        application=a,
                        license_version=license_version,
                        granted_by=reviewer,
                        created_at=a.decided_at,
                    )
                    for release in wanted[a.pk]
                ]
    ApplicationEvent.objects.bulk_create(events)
    Grant.objects.bulk_create(new_grants)
    decided = sum(1 for a in applications if a.decided_at is not None)
    return decided, len(new_grants)
