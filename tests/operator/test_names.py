"""Deterministic, length-limited names per generation."""

import re

from adaptermerge_operator import names

DNS_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def test_short_names_are_name_dash_generation():
    assert names.job_name("dev-assistant", 3) == "dev-assistant-3"


def test_a_name_that_exactly_fits_is_kept():
    name = "a" * (63 - len("-7"))
    assert names.job_name(name, 7) == name + "-7"


def test_long_names_keep_their_generation_and_stay_distinct():
    prefix = "m" * 70
    first, second = names.job_name(prefix + "-one", 1), names.job_name(prefix + "-two", 1)
    assert first != second
    for name in (first, second):
        assert len(name) == 63 and name.endswith("-1") and name.startswith("m" * 40)
    assert names.job_name(prefix + "-one", 1) == first  # same input, same name: adoption relies on it


def test_shortening_does_not_leave_a_dangling_separator():
    name = "a" * 51 + "." + "b" * 30  # the cut falls right after the dot
    short = names.job_name(name, 1)
    assert ".-" not in short and "--" not in short


def test_label_values_are_valid_for_any_resource_name():
    for name in ("dev", "team.merge.v2", "x" * 253):
        value = names.label_value(name)
        assert len(value) <= 63 and DNS_LABEL_VALUE.match(value), value
    assert names.label_value("team.merge.v2") == "team.merge.v2"
