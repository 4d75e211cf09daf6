"""The API docs page in Chromium, offline: Swagger UI from this origin, under the CSP."""

from __future__ import annotations

import pytest

# Filled in by the page: every CSP violation the browser reports.
RECORD_VIOLATIONS = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__violations.push(event.violatedDirective + " " + event.blockedURI);
});
"""


@pytest.mark.django_db(transaction=True)
def test_swagger_ui_lists_the_operations_offline_under_the_policy(live_server, page, artifacts):
    base = live_server.url
    outside: list[str] = []

    def offline(route) -> None:
        url = route.request.url
        if url.startswith(base + "/"):
            route.continue_()
        else:  # no network beyond this origin, as in a lab without internet access
            outside.append(url)
            route.abort()

    page.context.route("**/*", offline)
    page.add_init_script(RECORD_VIOLATIONS)
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))

    response = page.goto(f"{base}/api/docs/")
    assert response.status == 200
    assert "script-src 'self'" in response.headers["content-security-policy"]
    page.wait_for_selector(".opblock-summary-path", timeout=20_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert "/api/applications/" in paths and "/api/releases/" in paths
    assert page.locator(".opblock-post").count() >= 5
    page.locator(".opblock-summary-path", has_text="/api/releases/").first.click()
    page.get_by_role("button", name="Try it out").wait_for()
    page.screenshot(path=str(artifacts / "api-docs.png"), full_page=False)

    assert outside == []
    assert page.evaluate("window.__violations") == []
    refused = [line for line in console if "Content Security Policy" in line or "Refused" in line]
    assert refused == [] and not [line for line in console if line.startswith("pageerror")]
