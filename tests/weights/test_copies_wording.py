"""Budgets in words that read right: "1 full copy", "5 full copies", "0.5 of a copy left",
on the landing page, on My downloads and in the link email."""

from __future__ import annotations

import pytest
from django.urls import reverse

from access.services.reviews import application_approve
from weights.models import Artifact, LinkUsage
from weights.services import links

pytestmark = pytest.mark.django_db

SIZE = 1000


@pytest.fixture
def grant(alice, reviewer, make_submitted, releases):
    application = make_submitted(alice, slugs=("llama-7b",))
    [grant] = application_approve(
        application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
    )
    for path in ("7B/a.pth", "7B/b.pth", "7B/c.pth"):
        Artifact.objects.create(
            release=releases["llama-7b"],
            path=path,
            size=SIZE,
            sha256="a" * 64,
            md5="b" * 32,
            storage_key=path,
        )
    return grant


def _spend(issued: links.IssuedLink, path: str, nbytes: int) -> None:
    artifact = Artifact.objects.get(path=path)
    LinkUsage.objects.update_or_create(
        link=issued.link, artifact=artifact, defaults={"bytes_charged": nbytes}
    )


@pytest.mark.parametrize(
    ("copies", "spent", "budget_text", "left"),
    [
        (1, {"7B/b.pth": SIZE // 2, "7B/c.pth": SIZE}, "1 full copy", ["1 copy left", "0.5 of a copy left", "none left"]),
        (5, {"7B/b.pth": SIZE // 2, "7B/c.pth": 4 * SIZE}, "5 full copies", ["5 copies left", "4.5 copies left", "1 copy left"]),
    ],
)  # fmt: skip
def test_budget_wording_on_every_page_and_in_the_email(
    client, alice, grant, copies, spent, budget_text, left
):
    issued = links.link_issue(grant=grant, budget_copies=copies)
    for path, nbytes in spent.items():
        _spend(issued, path, nbytes)

    email = links.link_email(grant, issued)
    html = email.alternatives[0][0]
    for text in (email.body, html):
        assert f"allows {budget_text} of each file" in text
    landing = client.get(f"/d/{issued.token}/").content.decode()
    assert f"<strong>{budget_text}</strong> of each file" in landing

    client.force_login(alice)
    page = client.get(reverse("weights:my_downloads")).content.decode()
    assert f"{budget_text} per file." in page
    cells = [f"<td>{text}</td>" for text in left]
    assert all(cell in page for cell in cells), page
    assert "copies</td>" not in page.replace("copies left</td>", "")  # no "1.00 copies"
