"""Embedded mode: every email is printed and kept as an .eml file under var/mail/."""

from __future__ import annotations

import email

from django.core.mail import EmailMultiAlternatives, get_connection


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
