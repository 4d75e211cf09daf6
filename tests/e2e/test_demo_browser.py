"""A grantee signs in, generates on the demo page and watches the text stream in."""

# ruff: noqa: F811  (the fixtures imported from test_views are parameters here)

from __future__ import annotations

import pytest

from inference_demo.models import DemoRequest
from tests.inference_demo.conftest import demo_dir  # noqa: F401 (fixture)
from tests.inference_demo.test_openai_backend import backend, server  # noqa: F401 (fixtures)
from tests.inference_demo.test_views import (  # noqa: F401 (fixtures)
    DEMO,
    demo_release,
    embedded,
    grantee,
)

# Timestamps of the page's own changes: each time the output grows, and when the stats appear.
WATCH = """() => {
  window.__grew = [];
  window.__doneAt = null;
  const output = document.getElementById("demo-output");
  const stats = document.getElementById("demo-stats");
  new MutationObserver(() => {
    window.__grew.push([performance.now(), output.textContent.length]);
  }).observe(output, {childList: true, characterData: true, subtree: true});
  new MutationObserver(() => {
    if (stats.dataset.done === "true" && window.__doneAt === null) {
      window.__doneAt = performance.now();
    }
  }).observe(stats, {attributes: true});
}"""


def sign_in_to_the_demo(page, base_url: str, user, password: str) -> None:
    """Through the real login form, which sends the user on to the demo page."""
    page.goto(f"{base_url}/accounts/login/?next=/demo/{DEMO}/")
    page.get_by_label("Email").fill(user.email)
    page.get_by_label("Password").fill(password)
    page.locator("main form button[type=submit]").click()
    page.wait_for_url(f"{base_url}/demo/{DEMO}/")


@pytest.mark.django_db(transaction=True)
def test_grantee_watches_tokens_arrive(live_server, page, artifacts, grantee, password, embedded):
    sign_in_to_the_demo(page, live_server.url, grantee, password)
    assert page.get_by_role("heading", name="Try LLaMA demo").is_visible()
    assert page.locator("#demo-unavailable").is_hidden()

    page.get_by_label("Prompt").fill("Once upon a time")
    page.get_by_label("Max new tokens").fill("200")
    page.get_by_label("Temperature").fill("0.8")
    page.evaluate(WATCH)
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("#demo-stats[data-done=true]", timeout=60_000)

    grew = page.evaluate("window.__grew")
    done_at = page.evaluate("window.__doneAt")
    before_done = [(t, n) for t, n in grew if t < done_at]
    # Text arrived in several pieces, the first well before generation ended.
    assert len(before_done) >= 2, grew
    assert before_done[0][1] < before_done[-1][1]
    assert before_done[0][0] < done_at

    text = page.locator("#demo-output").inner_text()
    assert text.strip()
    assert page.locator("#demo-status").inner_text() == "Done."
    assert page.locator("#demo-ttft").inner_text().endswith(" ms")
    assert page.locator("#demo-speed").inner_text().endswith(" tokens/s")
    assert page.get_by_role("button", name="Generate").is_enabled()
    assert page.get_by_role("button", name="Stop").is_disabled()
    page.screenshot(path=str(artifacts / "demo.png"), full_page=True)

    row = DemoRequest.objects.get()
    assert (row.user, row.client, row.status) == (grantee, "web", "done")
    assert row.tokens_out > 0

    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    page.screenshot(path=str(artifacts / "demo-phone.png"), full_page=True)


@pytest.mark.django_db(transaction=True)
def test_a_release_served_by_an_openai_server_streams_in_the_page(
    live_server, page, grantee, password, backend, server
):
    """DEMO_OPENAI_BACKENDS points llama-demo at `python -m inference_demo.serve` over HTTP."""
    served_before = server.log.read_text().count("finish_reason=")
    sign_in_to_the_demo(page, live_server.url, grantee, password)
    assert page.locator("#demo-unavailable").is_hidden()

    page.get_by_label("Prompt").fill("Once upon a time")
    page.get_by_label("Max new tokens").fill("120")
    page.get_by_label("Temperature").fill("0.8")
    page.evaluate(WATCH)
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("#demo-stats[data-done=true]", timeout=60_000)

    grew = page.evaluate("window.__grew")
    done_at = page.evaluate("window.__doneAt")
    before_done = [(t, n) for t, n in grew if t < done_at]
    assert len(before_done) >= 2 and before_done[0][1] < before_done[-1][1], grew
    assert page.locator("#demo-output").inner_text().strip()
    assert page.locator("#demo-status").inner_text() == "Done."

    row = DemoRequest.objects.get()
    assert (row.user, row.client, row.status) == (grantee, "web", "done")
    assert row.tokens_out > 0
    # The text came from the server: it logged exactly one more finished completion.
    assert server.log.read_text().count("finish_reason=") == served_before + 1


@pytest.mark.django_db(transaction=True)
def test_without_a_worker_the_page_says_unavailable(live_server, page, grantee, password, settings):
    settings.DEMO_TRANSPORT = "redis"
    settings.REDIS_URL = "redis://127.0.0.1:9/0"  # nothing listens there: no worker, no broker
    sign_in_to_the_demo(page, live_server.url, grantee, password)
    assert page.locator("#demo-unavailable").is_visible()  # said at page load

    page.get_by_label("Prompt").fill("Hello")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("#demo-error:not([hidden])", timeout=15_000)
    assert "unavailable" in page.locator("#demo-error").inner_text()
    assert page.get_by_role("button", name="Generate").is_enabled()  # no endless spinner
    assert DemoRequest.objects.get().status == "failed"
