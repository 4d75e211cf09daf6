"""The whole journey in a browser: sign up, verify, apply, get approved, download, demo.

A new researcher signs up and confirms the emailed address, applies for a generated sample
release and the demo release and accepts the license; a reviewer signs in with a password
and an authenticator (TOTP) code and approves both in the admin; the researcher opens the
emailed link, downloads every file with the portal's downloader and checks the bytes, and
finally watches text stream in on the demo page. Screenshots go to
test-artifacts/journey-NN-<step>.png.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command

from access.models import Application, Grant
from tests.e2e.test_demo_browser import WATCH
from tests.twofactor import activate_totp, current_totp_code
from weights import download
from weights.storage import reset_storage

RESEARCHER = "ada@uni.example.edu"
SAMPLE, DEMO = "llama-7b", "llama-demo"
NAMES = {SAMPLE: "LLaMA 7B", DEMO: "LLaMA demo"}
CONFIRM_PATH = re.compile(r"/accounts/confirm-email/[^/\s]+/")
LANDING_URL = re.compile(r"https?://[^\s\"<>]+/d/[^/\s\"<>]+/")


class Shots:
    """Numbered full-page screenshots: journey-01-signup.png, journey-02-..."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.count = directory, 0
        for old in directory.glob("journey-*.png"):
            old.unlink()

    def __call__(self, page, step: str) -> None:
        self.count += 1
        page.screenshot(
            path=str(self.directory / f"journey-{self.count:02d}-{step}.png"), full_page=True
        )


def wait_for_mail(outbox: list, match: Callable, count: int = 1, timeout: float = 10.0) -> list:
    """Messages are sent after commit in the server's thread; give them a moment."""
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in outbox if match(m)]
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) >= count, [(m.to, m.subject) for m in outbox]
            return found
        time.sleep(0.05)


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def published(settings, tmp_path) -> dict[str, Path]:
    """A generated two-shard 7B release and the bundled demo model, in local storage."""
    settings.WEIGHTS_STORAGE = "local"
    settings.WEIGHTS_LOCAL_ROOT = tmp_path / "storage"
    reset_storage()
    sample = tmp_path / "sample-7b"
    call_command("generate_sample_release", str(sample), "--shards", "2", "--shard-mb", "1")
    sources = {SAMPLE: sample, DEMO: Path(django_settings.DEMO_MODELS[DEMO])}
    for slug, source in sources.items():
        call_command(
            "publish_release", str(source), "--slug", slug, "--name", NAMES[slug], verbosity=0
        )
    yield sources
    reset_storage()


@pytest.mark.django_db(transaction=True)
def test_full_journey(
    live_server,
    browser,
    artifacts,
    settings,
    tmp_path,
    mailoutbox,
    reviewer,
    password,
    license_v1,
    published,
):
    base = live_server.url
    settings.SITE_URL = base  # links in emails point at this server
    settings.DEMO_TRANSPORT, settings.DEMO_DEVICE = "inprocess", "cpu"
    shot = Shots(artifacts)
    researcher_context = browser.new_context(viewport={"width": 1200, "height": 900})
    reviewer_context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = researcher_context.new_page()
        page.set_default_timeout(30_000)

        # 1. Sign up.
        page.goto(f"{base}/accounts/signup/")
        page.locator("input[name=email]").fill(RESEARCHER)
        page.locator("input[name=password1]").fill(password)
        page.locator("input[name=password2]").fill(password)
        shot(page, "signup")
        page.get_by_role("button", name="Sign Up").click()
        page.wait_for_url(re.compile(r"/accounts/confirm-email/$"))
        shot(page, "verification-sent")

        # 2. Confirm the address from the email (a POST button, not the GET itself).
        [mail] = wait_for_mail(mailoutbox, lambda m: m.to == [RESEARCHER])
        confirm = CONFIRM_PATH.search(mail.body)
        assert confirm, mail.body
        page.goto(base + confirm.group(0))
        shot(page, "confirm-email")
        page.get_by_role("button", name="Confirm").click()
        # Confirming in the browser that signed up signs the researcher in.
        page.wait_for_url(lambda url: "/accounts/confirm-email/" not in url)
        assert page.get_by_role("button", name="Sign out").is_visible(), page.url
        shot(page, "signed-in")

        # 3. Apply for the sample release and the demo, accepting the license.
        page.goto(f"{base}/apply/")
        assert "/accounts/login/" not in page.url, "the confirmed researcher is not signed in"
        form = page.locator("main form").first
        form.locator("[name=full_name]").fill("Ada Researcher")
        form.locator("[name=institutional_email]").fill(RESEARCHER)
        form.locator("[name=affiliation]").fill("University of Example")
        form.locator("[name=organisation_type]").select_option("academic")
        form.locator("[name=country]").select_option("GB")
        form.locator("[name=role]").fill("Postdoctoral researcher")
        form.locator("[name=intended_use]").fill(
            "Evaluating factual recall of LLaMA models for a paper on calibration."
        )
        for name in NAMES.values():
            form.get_by_role("checkbox", name=name, exact=True).check()
        form.get_by_label("I have read and accept the license above").check()
        shot(page, "apply")
        form.get_by_role("button", name="Submit application").click()
        page.wait_for_url(re.compile(r"/applications/\d+/$"))
        assert "Application submitted" in page.content()
        shot(page, "submitted")
        application = Application.objects.get(applicant__email=RESEARCHER)
        assert application.status == Application.Status.SUBMITTED
        assert {r.slug for r in application.requested_releases.all()} == set(NAMES)

        # 4. The reviewer signs in (password, then authenticator code) in another context.
        secret = activate_totp(reviewer)
        admin = reviewer_context.new_page()
        admin.set_default_timeout(30_000)
        admin.goto(f"{base}/accounts/login/?next=/admin/")
        admin.locator("input[name=login]").fill(reviewer.email)
        admin.locator("input[name=password]").fill(password)
        admin.get_by_role("button", name="Sign In").click()
        admin.wait_for_url(re.compile(r"/accounts/2fa/authenticate/"))
        shot(admin, "reviewer-2fa")
        # A code is good for its 30 s step only: type it and send it at once.
        admin.locator("input[name=code]").fill(current_totp_code(secret))
        admin.get_by_role("button", name="Sign In").click()
        admin.wait_for_url(f"{base}/admin/")

        # 5. Open the application in the admin and approve both releases.
        admin.goto(f"{base}/admin/access/application/")
        admin.locator("#result_list").get_by_role("link", name="Ada Researcher").click()
        admin.wait_for_url(f"{base}/admin/access/application/{application.pk}/change/")
        shot(admin, "admin-application")
        admin.locator("a.decision-link", has_text="Approve").click()
        admin.wait_for_url(f"{base}/admin/access/application/{application.pk}/approve/")
        boxes = admin.locator("input[type=checkbox][name=releases]")
        assert boxes.count() == 2
        for i in range(2):
            boxes.nth(i).check()
        shot(admin, "approve")
        admin.locator("#content-main form input[type=submit]").click()
        admin.wait_for_url(f"{base}/admin/access/application/{application.pk}/change/")
        assert "Approved" in admin.locator("ul.messagelist").inner_text()
        shot(admin, "approved")
        application.refresh_from_db()
        assert application.status == Application.Status.APPROVED
        assert Grant.objects.filter(user__email=RESEARCHER, revoked_at=None).count() == 2

        # 6. One download-link email per release reaches the researcher.
        link_mails = wait_for_mail(
            mailoutbox, lambda m: m.to == [RESEARCHER] and LANDING_URL.search(m.body), count=2
        )
        urls = {}
        for message in link_mails:
            [slug] = [s for s, name in NAMES.items() if name in message.subject]
            urls[slug] = LANDING_URL.search(message.body).group(0)
        assert set(urls) == set(NAMES)
        assert all(url.startswith(base + "/d/") for url in urls.values())

        # 7. The emailed landing page lists the files.
        page.goto(urls[SAMPLE])
        assert page.get_by_role("heading", name=f"Download {NAMES[SAMPLE]}").is_visible()
        listed = page.locator("main table tbody td:first-child a").all_inner_texts()
        assert sorted(listed) == sorted(files_under(published[SAMPLE])), listed
        shot(page, "landing")

        # 8. The downloader fetches every file of both releases; the bytes match the source.
        for slug, url in urls.items():
            dest = tmp_path / "downloaded" / slug
            assert download.main([url, "--dest", str(dest), "--quiet"]) == 0, slug
            assert files_under(dest) == files_under(published[slug]), slug

        # 9. The demo streams text: it grows before the stats say done.
        page.goto(f"{base}/demo/{DEMO}/")
        assert page.locator("#demo-unavailable").is_hidden()
        page.get_by_label("Prompt").fill("Once upon a time")
        page.get_by_label("Max new tokens").fill("64")
        page.evaluate(WATCH)
        page.get_by_role("button", name="Generate").click()
        page.wait_for_selector("#demo-stats[data-done=true]", timeout=60_000)
        grew = page.evaluate("window.__grew")
        done_at = page.evaluate("window.__doneAt")
        before_done = [(t, n) for t, n in grew if t < done_at and n > 0]
        assert before_done, (grew, done_at)
        assert page.locator("#demo-output").inner_text().strip()
        assert page.locator("#demo-status").inner_text() == "Done."
        shot(page, "demo")
    finally:
        researcher_context.close()
        reviewer_context.close()
