"""The reviewer's single-key shortcuts in Chromium, under the portal's CSP (no inline script)."""

from __future__ import annotations

import re

import pytest

from access.models import Application
from tests.e2e.test_api_docs_browser import RECORD_VIOLATIONS
from tests.factories import UserFactory
from tests.twofactor import activate_totp, current_totp_code


@pytest.mark.django_db(transaction=True)
def test_keys_claim_open_approve_and_go_to_the_next_unclaimed(
    live_server, page, reviewer, password, alice, make_submitted
):
    base = live_server.url
    first = make_submitted(alice)
    second = make_submitted(UserFactory(username="bea", email="bea@uni.example.edu"))
    page.add_init_script(RECORD_VIOLATIONS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    secret = activate_totp(reviewer)
    page.goto(f"{base}/accounts/login/?next=/admin/")
    page.locator("input[name=login]").fill(reviewer.email)
    page.locator("input[name=password]").fill(password)
    page.get_by_role("button", name="Sign In").click()
    page.wait_for_url(re.compile(r"/accounts/2fa/authenticate/"))
    page.locator("input[name=code]").fill(current_totp_code(secret))
    page.get_by_role("button", name="Sign In").click()
    page.wait_for_url(f"{base}/admin/")

    change = f"{base}/admin/access/application/{first.pk}/change/"
    page.goto(change)
    page.keyboard.press("c")  # claim
    page.wait_for_selector("text=Held by you")
    assert Application.objects.get(pk=first.pk).claimed_by_id == reviewer.pk

    page.keyboard.press("a")  # open approve
    page.wait_for_url(f"{base}/admin/access/application/{first.pk}/approve/")
    page.locator("textarea[name=note]").press("a")  # typing in a field is typing, not a key
    assert page.url.endswith(f"/{first.pk}/approve/")

    page.goto(change)
    page.keyboard.press("n")  # the next application nobody holds
    page.wait_for_url(f"{base}/admin/access/application/{second.pk}/change/")
    page.keyboard.press("r")
    page.wait_for_url(f"{base}/admin/access/application/{second.pk}/reject/")

    assert page.evaluate("window.__violations") == []
    assert errors == []
