"""Errors raised by access services. Messages are constants so tests can import them."""

from __future__ import annotations


class ServiceError(Exception):
    """A refused state change. Views turn it into a message, the API into a 4xx."""

    code = "invalid"
    http_status = 400

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code:
            self.code = code


class IllegalTransition(ServiceError):
    code = "illegal_transition"
    http_status = 409


class NotAllowed(ServiceError):
    code = "not_allowed"
    http_status = 403


class InvalidInput(ServiceError):
    code = "invalid"
    http_status = 400


class NotFound(ServiceError):
    code = "not_found"
    http_status = 404


ALREADY_OPEN = "You already have an open application. Finish, withdraw or wait for it first."
NO_CURRENT_LICENSE = "No license is in effect yet; applications are closed."
LICENSE_NOT_ACCEPTED = "You must accept the current license to submit."
LICENSE_OUTDATED = "The license changed since you accepted it; read and accept the new version."
NO_RELEASES = "Choose at least one release."
ALREADY_GRANTED = "You already have access to: {releases}."
INCOMPLETE = "Complete these fields before submitting: {fields}."
EMAIL_NOT_VERIFIED = "Verify your email address before applying."
OWN_APPLICATION = "You cannot decide your own application."
NOT_REVIEWER = "Only reviewers can decide applications."
REASON_REQUIRED = "A reason is required; it is shown to the applicant."
QUESTION_REQUIRED = "A question is required; it is shown to the applicant."
ANSWER_REQUIRED = "An answer is required."
RELEASES_NOT_REQUESTED = "These releases were not requested: {releases}."
TRANSITION = "Cannot {action} an application that is {status}."
