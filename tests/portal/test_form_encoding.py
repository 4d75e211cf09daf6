"""Form bodies that are not UTF-8 get one 400 on every page, urlencoded or multipart."""

from __future__ import annotations

import pytest
from django.urls import reverse

from access.models import Application, LicenseAcceptance
from portal.form_encoding import MALFORMED_MULTIPART, NOT_UTF8

pytestmark = pytest.mark.django_db
APPLY = reverse("access:apply")
BOUNDARY = "portal-test-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def multipart(*fields: tuple[bytes, bytes], files: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A multipart/form-data body from raw (name, value) bytes, as a browser would send it."""
    mark = b"--" + BOUNDARY.encode()
    parts = [
        mark + b'\r\nContent-Disposition: form-data; name="' + name + b'"\r\n\r\n' + value
        for name, value in fields
    ]
    parts += [
        mark
        + b'\r\nContent-Disposition: form-data; name="'
        + name
        + b'"; filename="data.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'
        + content
        for name, content in files
    ]
    return b"\r\n".join(parts) + b"\r\n" + mark + b"--\r\n"


@pytest.fixture
def alice_client(client, alice):
    client.force_login(alice)
    return client


def refused(response) -> bool:
    return response.status_code == 400 and NOT_UTF8 in response.content.decode()


@pytest.mark.parametrize(
    "body",
    [
        multipart((b"full_name", b"Zo\xeb"), (b"action", b"save")),  # Latin-1, not UTF-8
        multipart((b"full_name", b"\xc3\x28"), (b"action", b"save")),
        multipart((b"full_\xffname", b"Alice"), (b"action", b"save")),  # in a field name
        multipart(
            (b"full_name", b"\xff\xfe"),
            (b"action", b"submit"),
            (b"accept_license", b"on"),
            files=((b"attachment", b"%PDF-1.4 \x00\xff"),),
        ),
    ],
)
def test_multipart_form_not_in_utf8_is_a_400_and_no_row(alice_client, license_v1, releases, body):
    response = alice_client.generic("POST", APPLY, body, content_type=MULTIPART)
    assert refused(response)
    assert not Application.objects.exists() and not LicenseAcceptance.objects.exists()


def test_utf8_multipart_still_parses_after_the_check(alice_client, alice, license_v1, releases):
    name = "Zoë Ångström 王小明"
    bad = multipart((b"full_name", name.encode("latin-1", "replace")), (b"action", b"save"))
    assert refused(alice_client.generic("POST", APPLY, bad, content_type=MULTIPART))
    good = multipart(
        (b"full_name", name.encode()),
        (b"action", b"save"),
        files=((b"attachment", b"\x00\xff\xfe binary bytes are not form text"),),
    )
    response = alice_client.generic("POST", APPLY, good, content_type=MULTIPART)
    assert response.status_code == 302, response.content[:300]
    assert Application.objects.get(applicant=alice).full_name == name


def test_a_declared_charset_other_than_utf8_is_refused(alice_client, alice, license_v1, releases):
    body = "full_name=Zo%C3%AB&action=save"
    response = alice_client.generic(
        "POST", APPLY, body, content_type="application/x-www-form-urlencoded; charset=iso-8859-1"
    )
    assert refused(response)
    assert not Application.objects.exists()
    response = alice_client.generic(
        "POST", APPLY, body, content_type="application/x-www-form-urlencoded; charset=UTF-8"
    )
    assert response.status_code == 302
    assert Application.objects.get(applicant=alice).full_name == "Zoë"


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"login=alice%FF&password=x", "application/x-www-form-urlencoded"),
        (multipart((b"login", b"alice\xff"), (b"password", b"x")), MULTIPART),
    ],
)
@pytest.mark.parametrize("page", ["account_login", "account_signup", "account_reset_password"])
def test_every_page_refuses_forms_not_in_utf8(client, alice, page, body, content_type):
    response = client.generic("POST", reverse(page), body, content_type=content_type)
    assert refused(response)


def test_a_multipart_body_without_a_boundary_is_a_400_that_says_so(alice_client, license_v1):
    response = alice_client.generic(
        "POST", APPLY, b"full_name=x", content_type="multipart/form-data"
    )
    assert response.status_code == 400
    assert response.content.decode() == MALFORMED_MULTIPART.format(
        error="Invalid boundary in multipart: None"
    )
    assert not Application.objects.exists()


class CountingStream:
    """An endless multipart upload that records how much of it the server read."""

    def __init__(self) -> None:
        self.read_bytes = 0
        self.head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="publications"\r\n\r\n'
        ).encode()

    def read(self, size: int = -1) -> bytes:
        size = 64 * 1024 if size is None or size < 0 else size
        chunk = (self.head + b"x" * size)[:size]
        self.head = self.head[len(chunk) :]
        self.read_bytes += len(chunk)
        return chunk

    def readline(self, size: int = -1) -> bytes:
        return self.read(size)


def test_an_oversized_multipart_body_is_refused_before_it_is_read(
    alice_client, license_v1, releases, settings
):
    stream = CountingStream()
    declared = settings.DATA_UPLOAD_MAX_MEMORY_SIZE * 40
    response = alice_client.generic(
        "POST",
        APPLY,
        b"-",
        content_type=MULTIPART,
        **{"wsgi.input": stream, "CONTENT_LENGTH": str(declared)},
    )
    assert response.status_code == 400
    assert stream.read_bytes == 0
    assert not Application.objects.exists()
