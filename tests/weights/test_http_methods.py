"""Methods on /d/<token>/...: only GET and HEAD; anything else is a 405, never a CSRF 403."""

from __future__ import annotations

import pytest
from django.test import Client

BAD_TOKEN = "AbCdEfGhIjKlMnOpQrStUvWxYz012345"
URLS = [
    f"/d/{BAD_TOKEN}/",
    f"/d/{BAD_TOKEN}/manifest.json",
    f"/d/{BAD_TOKEN}/download.sh",
    f"/d/{BAD_TOKEN}/7B/consolidated.00.pth",
]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("url", URLS)
def test_other_methods_are_405_with_allow_even_without_a_csrf_cookie(db, url, method, caplog):
    # A real client: CSRF is checked, and there is no cookie to pass it.
    client = Client(enforce_csrf_checks=True)
    response = client.generic(method, url, b"x=1", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD"
    assert response["Referrer-Policy"] == "no-referrer"
    assert BAD_TOKEN not in caplog.text
