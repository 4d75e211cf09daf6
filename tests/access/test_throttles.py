"""The submission allowance rule itself: its rate format and its transaction guard."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.transaction import TransactionManagementError
from django.test import override_settings

from access.services import throttles


@pytest.mark.parametrize(
    ("value", "count", "seconds"),
    [("10/h", 10, 3600), ("3/30m", 3, 1800), ("10/hour", 10, 3600), (" 1/d ", 1, 86400)],
)
def test_rates_in_the_format_the_setting_always_used(value, count, seconds):
    assert throttles.rate_parse(value) == throttles.Rate(count, timedelta(seconds=seconds))


@pytest.mark.parametrize("value", ["", "10", "ten/h", "10/y", "0/h", "10/0m", "-1/h", "10/h,5/m"])
def test_a_bad_rate_is_a_configuration_error(value):
    with pytest.raises(ImproperlyConfigured, match="PORTAL_SUBMIT_RATE must look like"):
        throttles.rate_parse(value)


@pytest.mark.django_db(transaction=True)  # the test itself is then outside any transaction
def test_the_check_refuses_to_run_outside_the_submissions_transaction(alice):
    with pytest.raises(TransactionManagementError, match=throttles.NOT_IN_TRANSACTION):
        throttles.submission_allowance_check(user=alice)
    with transaction.atomic():
        throttles.submission_allowance_check(user=alice)


@pytest.mark.django_db
@override_settings(PORTAL_SUBMIT_RATE="1/m")
def test_a_user_at_the_limit_is_told_when_there_is_room_again(alice, make_submitted):
    make_submitted(alice)
    with transaction.atomic(), pytest.raises(throttles.SubmitRateLimited) as refused:
        throttles.submission_allowance_check(user=alice)
    assert str(refused.value) == throttles.SUBMIT_RATE_LIMITED
    assert (refused.value.http_status, refused.value.code) == (429, "throttled")
    assert 55 <= refused.value.retry_after <= 60
