"""Create a reviewer, or make an existing account one.

A reviewer is a staff user in the Reviewers group with a verified email address.
The admin asks for TOTP setup at the first sign-in and opens only after it.
"""

from __future__ import annotations

import sys

from allauth.account.models import EmailAddress
from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.core.validators import validate_email
from django.db import transaction
from django.urls import reverse

from access.services.reviewers import reviewers_group_ensure

TOTP_NOTICE = (
    "Two-factor authentication is required: at the first sign-in the admin asks this "
    "reviewer to set up an authenticator app (TOTP) and opens only after that."
)


class Command(BaseCommand):
    help = "Create a reviewer (staff, Reviewers group, verified email) or upgrade an existing user."
    stealth_options = ("stdin",)

    def add_arguments(self, parser) -> None:
        parser.add_argument("email")
        parser.add_argument(
            "--password-stdin",
            action="store_true",
            help="Read the password from the first line of standard input (never from the command line).",
        )
        parser.add_argument(
            "--superuser", action="store_true", help="Also make the user a superuser."
        )

    def handle(self, *args, **options) -> None:
        email = options["email"].strip()
        try:
            validate_email(email)
        except ValidationError:
            raise CommandError(f"{email!r} is not a valid email address") from None
        password = None
        if options["password_stdin"]:
            stdin = options.get("stdin") or sys.stdin
            password = stdin.readline().rstrip("\r\n")
            if not password:
                raise CommandError("--password-stdin: no password on standard input")

        with transaction.atomic():
            user, created = self._user(email)
            user.is_staff = True
            user.is_active = True
            if options["superuser"]:
                user.is_superuser = True
            if password is not None:
                try:
                    validate_password(password, user)
                except ValidationError as exc:
                    raise CommandError("Password refused: " + " ".join(exc.messages)) from None
                user.set_password(password)
            elif created:
                user.set_unusable_password()
            user.save()
            user.groups.add(reviewers_group_ensure())
            self._verify(user, email)

        role = "superuser and reviewer" if user.is_superuser else "reviewer"
        self.stdout.write(f"{'Created' if created else 'Updated'} {role} {email}.")
        if not user.has_usable_password():
            self.stdout.write(
                "No password is set: the reviewer chooses one with 'Forgot password' at "
                f"{reverse('account_reset_password')}."
            )
        self.stdout.write(TOTP_NOTICE)

    def _user(self, email: str):
        address = EmailAddress.objects.filter(email__iexact=email).select_related("user").first()
        if address is not None:
            return address.user, False
        user_model = get_user_model()
        user = user_model.objects.filter(email__iexact=email).first()
        if user is not None:
            return user, False
        return user_model(username=_free_username(user_model, email), email=email), True

    def _verify(self, user, email: str) -> None:
        address = EmailAddress.objects.filter(user=user, email__iexact=email).first()
        if address is None:
            address = EmailAddress(user=user, email=email)
        EmailAddress.objects.filter(user=user, primary=True).exclude(pk=address.pk).update(
            primary=False
        )
        address.verified = True
        address.primary = True
        address.save()
        if user.email.lower() != email.lower():
            user.email = email
            user.save(update_fields=["email"])


def _free_username(user_model, email: str) -> str:
    base = email.lower()[:140]
    candidate, n = base, 1
    while user_model.objects.filter(username=candidate).exists():
        n += 1
        candidate = f"{base}-{n}"
    return candidate
