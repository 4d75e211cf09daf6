"""The closed vocabulary of approval-policy conditions (access.models.PolicyRule.conditions).

A rule's conditions are data: a list of objects such as
``{"type": "email_domain_in", "domains": ["ox.ac.uk"]}``, all of which must hold (AND).
Each type here says which parameters it takes, how they are checked when an operator saves
a rule, and how it is tested against `Facts`, the applicant's data loaded once per
application. Nothing here queries the database, so evaluation stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ValidationError

from access.free_mail_domains import FREE_MAIL_DOMAINS


@dataclass(frozen=True, slots=True)
class Facts:
    """What a policy may look at, read from an application beforehand."""

    institutional_email: str = ""
    verified_emails: frozenset[str] = frozenset()  # casefolded
    orcid: str = ""
    country: str = ""
    organisation_type: str = ""
    # Request-form answers, {release_slug: {question_key: value}}
    # (access.services.request_forms.answers_for); None when that module is not installed.
    answers: Mapping[str, Mapping[str, Any]] | None = field(default=None)

    @property
    def email_domain(self) -> str:
        return self.institutional_email.rpartition("@")[2].strip().casefold()


Test = Callable[[Facts], bool]


@dataclass(frozen=True)
class ConditionType:
    name: str
    description: str
    check: Callable[[dict[str, Any]], list[str]]  # parameter errors, [] when fine
    # (parameters, slug of the release whose policy it is) -> test
    compile: Callable[[dict[str, Any], str], Test]


def _domains(params: dict[str, Any]) -> tuple[str, ...]:
    return tuple(d.strip().casefold().lstrip("@") for d in params["domains"])


def _in_domains(domain: str, domains: tuple[str, ...]) -> bool:
    # A listed domain covers its subdomains: "ox.ac.uk" matches "cs.ox.ac.uk".
    return bool(domain) and any(domain == d or domain.endswith("." + d) for d in domains)


def _string_list(key: str, what: str, known: Callable[[], set[str]] | None = None):
    def check(params: dict[str, Any]) -> list[str]:
        value = params.get(key)
        if not isinstance(value, list) or not value:
            return [f'needs "{key}": a non-empty list of {what}']
        if not all(isinstance(item, str) and item.strip() for item in value):
            return [f'"{key}" must contain only non-empty strings']
        if known is not None:
            unknown = sorted(set(value) - known())
            if unknown:
                return [f"unknown {what}: {', '.join(unknown)}"]
        return []

    return check


def _no_params(params: dict[str, Any]) -> list[str]:
    return []


def _known_countries() -> set[str]:
    from django_countries import countries

    return {code for code, _ in countries}


def _known_organisation_types() -> set[str]:
    from access.models import OrganisationType

    return set(OrganisationType.values)


def _check_answer(params: dict[str, Any]) -> list[str]:
    errors = []
    key = params.get("key")
    if not isinstance(key, str) or not key.strip():
        errors.append('needs "key": the question key of the release\'s request form')
    if "value" not in params or not isinstance(params["value"], (str, bool, int, float)):
        errors.append('needs "value": a string, number or true/false')
    return errors


def _orcid_valid(orcid: str) -> bool:
    from access.validators import validate_orcid

    if not orcid:
        return False
    try:
        validate_orcid(orcid)
    except ValidationError:
        return False
    return True


def _answer_equals(params: dict[str, Any], release_slug: str) -> Test:
    key = params["key"].strip()
    expected = params["value"]
    if isinstance(expected, str):
        expected = expected.strip().casefold()

    def test(facts: Facts) -> bool:
        answers = (facts.answers or {}).get(release_slug, {})
        if key not in answers:
            return False
        answer = answers[key]
        if isinstance(answer, str) and isinstance(expected, str):
            return answer.strip().casefold() == expected
        return type(answer) is type(expected) and answer == expected

    return test


def _email_domain_in(params: dict[str, Any], release_slug: str) -> Test:
    domains = _domains(params)
    return lambda facts: _in_domains(facts.email_domain, domains)


def _email_domain_not_in(params: dict[str, Any], release_slug: str) -> Test:
    domains = _domains(params)
    return lambda facts: bool(facts.email_domain) and not _in_domains(facts.email_domain, domains)


def _country_in(params: dict[str, Any], release_slug: str) -> Test:
    codes = frozenset(code.upper() for code in params["countries"])
    return lambda facts: facts.country in codes


def _organisation_type_in(params: dict[str, Any], release_slug: str) -> Test:
    types = frozenset(params["types"])
    return lambda facts: facts.organisation_type in types


CONDITION_TYPES: dict[str, ConditionType] = {
    c.name: c
    for c in [
        ConditionType(
            "email_domain_in",
            'institutional email in one of "domains" (subdomains included)',
            _string_list("domains", "domains"),
            _email_domain_in,
        ),
        ConditionType(
            "email_domain_not_in",
            'institutional email in none of "domains" (subdomains included)',
            _string_list("domains", "domains"),
            _email_domain_not_in,
        ),
        ConditionType(
            "free_mail_domain",
            "institutional email at a free-mail provider (gmail.com, outlook.com, …)",
            _no_params,
            lambda params, slug: lambda facts: facts.email_domain in FREE_MAIL_DOMAINS,
        ),
        ConditionType(
            "email_verified",
            "institutional email is a verified address of the applicant's account",
            _no_params,
            lambda params, slug: (
                lambda facts: facts.institutional_email.strip().casefold() in facts.verified_emails
            ),
        ),
        ConditionType(
            "orcid_valid",
            "an ORCID iD is given and its ISO 7064 11-2 check digit is right",
            _no_params,
            lambda params, slug: lambda facts: _orcid_valid(facts.orcid),
        ),
        ConditionType(
            "country_in",
            'country is one of "countries" (ISO 3166 codes such as "GB")',
            _string_list("countries", "country codes", _known_countries),
            _country_in,
        ),
        ConditionType(
            "organisation_type_in",
            'organisation type is one of "types" (academic, government, …)',
            _string_list("types", "organisation types", _known_organisation_types),
            _organisation_type_in,
        ),
        ConditionType(
            "answer_equals",
            'the release request form\'s answer to "key" equals "value"',
            _check_answer,
            _answer_equals,
        ),
    ]
}


def conditions_errors(value: object) -> list[str]:
    """Every problem with a rule's conditions, each naming the condition it is about."""
    if not isinstance(value, list):
        return ['Conditions must be a list of objects, each with a "type".']
    problems = []
    for number, condition in enumerate(value, start=1):
        if not isinstance(condition, dict) or not isinstance(condition.get("type"), str):
            problems.append(f'Condition {number}: an object with a "type" is required.')
            continue
        kind = CONDITION_TYPES.get(condition["type"])
        if kind is None:
            known = ", ".join(CONDITION_TYPES)
            problems.append(
                f'Condition {number}: unknown type "{condition["type"]}" (known: {known}).'
            )
            continue
        params = {k: v for k, v in condition.items() if k != "type"}
        problems += [f"Condition {number} ({kind.name}): {p}." for p in kind.check(params)]
    return problems


def validate_conditions(value: object) -> None:
    problems = conditions_errors(value)
    if problems:
        raise ValidationError(problems)


def conditions_compile(conditions: list[dict[str, Any]], release_slug: str) -> tuple[Test, ...]:
    """Tests for valid conditions; an empty list compiles to no test and matches everyone."""
    return tuple(
        CONDITION_TYPES[c["type"]].compile(
            {k: v for k, v in c.items() if k != "type"}, release_slug
        )
        for c in conditions
    )


def conditions_help() -> str:
    lines = [f"{c.name}: {c.description}" for c in CONDITION_TYPES.values()]
    return "; ".join(lines)
