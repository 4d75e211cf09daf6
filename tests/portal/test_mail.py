"""Embedded mode: every email is printed and kept as an .eml file under var/mail/."""

from __future__ import annotations

import email
import re

import pytest
from django.core.mail import EmailMultiAlternatives, get_connection

from access.services.reviews import application_approve
from portal.logging_filters import KEY_MASK, TOKEN_MASK
from weights.models import DownloadLink
from weights.tokens import looks_like_token, token_hash

PASSWORD = "a much longer passphrase 42"


def test_console_and_file_backend_keeps_each_message_as_eml(settings, tmp_path, capsys):
    settings.EMAIL_FILE_PATH = tmp_path / "mail"
    message = EmailMultiAlternatives(
        subject="Application #7 approved",
        body="Approved for: LLaMA 7B.",
        to=["ada@uni.example.edu"],
    )
    message.attach_alternative("<p>Approved</p>", "text/html")
    connection = get_connection("portal.mail.ConsoleAndFileBackend")

    assert connection.send_messages([message]) == 1

    (saved,) = (tmp_path / "mail").glob("*.eml")
    parsed = email.message_from_bytes(saved.read_bytes())
    assert parsed["Subject"] == "Application #7 approved" and parsed["To"] == "ada@uni.example.edu"
    text, html = (part.get_payload(decode=True).decode() for part in parsed.get_payload())
    assert text == "Approved for: LLaMA 7B." and html == "<p>Approved</p>"
    assert "Application #7 approved" in capsys.readouterr().out


# --- no secret on stdout ---------------------------------------------------------------

SEPARATOR = "\n" + "-" * 79 + "\n"


@pytest.fixture
def embedded_mail(settings, tmp_path):
    settings.EMAIL_BACKEND = "portal.mail.ConsoleAndFileBackend"
    settings.EMAIL_FILE_PATH = tmp_path / "mail"
    return tmp_path / "mail"


def texts(message: email.message.Message) -> str:
    """Every text part, transfer encoding undone (quoted-printable, base64)."""
    return "\n".join(
        part.get_payload(decode=True).decode()
        for part in message.walk()
        if part.get_content_maintype() == "text"
    )


def printed(out: str) -> list[str]:
    """The decoded text of each message the console backend printed."""
    chunks = [chunk for chunk in out.split(SEPARATOR) if chunk.strip()]
    return [texts(email.message_from_string(chunk)) for chunk in chunks]


def saved(directory) -> list[str]:
    return [texts(email.message_from_bytes(path.read_bytes())) for path in directory.glob("*.eml")]


def assert_masked_on_stdout_kept_in_eml(out: str, directory, secret_url: re.Pattern, mask: str):
    (kept,) = saved(directory)
    secrets_in_mail = set(secret_url.findall(kept))
    assert secrets_in_mail, kept
    (shown,) = printed(out)
    for secret in secrets_in_mail:
        assert len(secret) >= 16
        assert secret not in out and secret not in shown
    assert mask in shown and not secret_url.search(shown)


@pytest.mark.django_db
def test_password_reset_key_is_masked_on_stdout_and_kept_in_the_eml(
    client, alice, embedded_mail, capsys
):
    assert client.post("/accounts/password/reset/", {"email": alice.email}).status_code == 302

    assert_masked_on_stdout_kept_in_eml(
        capsys.readouterr().out,
        embedded_mail,
        re.compile(r"/accounts/password/reset/key/([0-9a-z]+-[\w-]+)/"),
        f"/accounts/password/reset/key/{KEY_MASK}",
    )


@pytest.mark.django_db
def test_email_confirmation_key_is_masked_on_stdout_and_kept_in_the_eml(
    client, embedded_mail, capsys
):
    response = client.post(
        "/accounts/signup/",
        {"email": "dana@uni.example.edu", "password1": PASSWORD, "password2": PASSWORD},
    )
    assert response.status_code == 302

    assert_masked_on_stdout_kept_in_eml(
        capsys.readouterr().out,
        embedded_mail,
        re.compile(r"/accounts/confirm-email/([-:\w]+)/"),
        f"/accounts/confirm-email/{KEY_MASK}",
    )


@pytest.mark.django_db
def test_download_link_token_is_masked_on_stdout_and_kept_in_the_eml(
    alice,
    reviewer,
    make_submitted,
    releases,
    embedded_mail,
    capsys,
    django_capture_on_commit_callbacks,
    settings,
):
    application = make_submitted(alice, slugs=("llama-7b",))
    # Approval enqueues weights.tasks.issue_download_link after commit (eager here).
    with django_capture_on_commit_callbacks(execute=True):
        application_approve(
            application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
        )
    out = capsys.readouterr().out
    link_mails = [
        path
        for path in embedded_mail.glob("*.eml")
        if "download link" in email.message_from_bytes(path.read_bytes())["Subject"]
    ]
    (link_mail,) = link_mails
    kept = texts(email.message_from_bytes(link_mail.read_bytes()))
    (token,) = set(re.findall(r"/d/([A-Za-z0-9_-]+)/", kept))
    assert looks_like_token(token)
    assert DownloadLink.objects.filter(token_hash=token_hash(token)).exists()
    assert token not in out and token[:12] not in out
    (shown,) = [text for text in printed(out) if "You can now download LLaMA 7B" in text]
    assert token not in shown and f"/d/{TOKEN_MASK}/" in shown
    assert f'python -m weights.download "{settings.SITE_URL}/d/{TOKEN_MASK}/"' in shown


def test_a_token_is_masked_even_where_quoted_printable_folds_the_line(embedded_mail, capsys):
    token = "Qp7rS9tU1vW3xY5zA2bC4dE6fG8hJ0kL"
    # A line longer than 998 characters makes Django encode the body quoted-printable,
    # which folds lines and would split a token masked only after encoding.
    body = "x" * 1100 + f" https://portal.example/d/{token}/params.json"
    message = EmailMultiAlternatives(subject="Link", body=body, to=["ada@uni.example.edu"])
    get_connection().send_messages([message])

    out = capsys.readouterr().out
    assert "Content-Transfer-Encoding: quoted-printable" in out
    (shown,) = printed(out)
    assert token not in shown and token not in out.replace("=\n", "")
    assert shown.endswith(f"https://portal.example/d/{TOKEN_MASK}/params.json")
    (kept,) = saved(embedded_mail)
    assert kept == body
