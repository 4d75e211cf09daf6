"""Property-based tests of the application form and the API's write serializer.

Arbitrary text, unicode, control characters and huge values must never raise out of
validation; invalid input must come back as errors on the fields concerned.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from access.forms import ApplicationForm
from access.serializers import ApplicationWriteSerializer
from access.services.applications import EDITABLE_FIELDS

pytestmark = pytest.mark.django_db

FAST = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ORCID = re.compile(r"^\d{4}-\d{4}-\d{4}-\d{3}[\dX]$")
FORM_FIELDS = [*EDITABLE_FIELDS, "requested_releases", "accept_license"]

huge = st.builds(lambda s, n: (s or "x") * n, st.text(max_size=8), st.integers(1, 40_000))
hostile_text = st.one_of(
    st.text(max_size=300),
    st.text(st.characters(codec="utf-8"), max_size=300),
    st.text(st.characters(categories=["Cc", "Zs", "Mn", "So"]), max_size=50),
    huge,
    st.sampled_from(
        ["", " ", "\x00", "0000-0002-1825-0097", "javascript:alert(1)", "GB", "academic"]
    ),
)
# JSON can carry what a form cannot: lone surrogates, numbers, lists, objects, null.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | hostile_text
    | st.text(st.characters(categories=["Cs"]), max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)


def field_errors_are_named(errors, allowed) -> None:
    assert errors, "an invalid form must say why"
    assert set(errors) <= {*allowed, "__all__", "non_field_errors"}, set(errors)
    for messages in errors.values():
        assert messages and all(str(m) for m in messages)


@FAST
@given(st.dictionaries(st.sampled_from(FORM_FIELDS), hostile_text))
def test_application_form_never_raises(data):
    form = ApplicationForm(data=data)
    if not form.is_valid():
        field_errors_are_named(form.errors, FORM_FIELDS)
    full_name = data.get("full_name", "")
    if len(full_name.strip()) > 200 or "\x00" in full_name:
        assert "full_name" in form.errors
    orcid = data.get("orcid", "").strip()
    if orcid and not ORCID.match(orcid):
        assert "orcid" in form.errors


@FAST
@given(
    st.dictionaries(
        st.sampled_from([*EDITABLE_FIELDS, "releases"]) | st.text(max_size=10),
        json_values,
        max_size=8,
    )
)
def test_write_serializer_never_raises(data):
    serializer = ApplicationWriteSerializer(data=data)
    if not serializer.is_valid():
        assert serializer.errors
        for name in serializer.errors:
            assert name in data or name == "non_field_errors", name
    unknown = set(data) - {*EDITABLE_FIELDS, "releases"}
    if unknown:
        assert unknown <= set(serializer.errors)


@FAST
@given(json_values)
def test_write_serializer_refuses_non_objects_cleanly(body):
    serializer = ApplicationWriteSerializer(data=body)
    if not isinstance(body, dict):
        assert not serializer.is_valid()
        assert serializer.errors
