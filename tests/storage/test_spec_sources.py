"""The spec's s3:// fields: today's path specs stay valid, exactly one of path and uri, URIs checked."""

from __future__ import annotations

import pytest

from merge_worker.spec import SpecError, parse_spec


def _spec(adapter: dict, output: dict | None = None, **extra) -> dict:
    return {"adapters": [{"name": "a", **adapter}], "method": "linear",
            "output": output or {"path": "out"}, **extra}


def test_a_path_spec_is_unchanged():
    spec = parse_spec(_spec({"path": "adapters/a"}, volume={"claimName": "store"}))
    assert spec.adapters[0].path == "adapters/a" and spec.adapters[0].uri is None
    assert spec.claims() == {"store": True}


def test_uri_sources_need_no_claim():
    spec = parse_spec(_spec({"uri": "s3://models/adapters/a"}, {"uri": "s3://models/out"},
                            storage={"endpoint": "http://127.0.0.1:9000", "credentialsSecret": "s3-creds"}))
    assert spec.adapters[0].uri == "s3://models/adapters/a"
    assert spec.claims() == {}
    assert spec.storage.credentials_secret == "s3-creds"


@pytest.mark.parametrize(("adapter", "field"), [
    ({"path": "a", "uri": "s3://models/a"}, "spec.adapters[0]"),
    ({}, "spec.adapters[0]"),
    ({"uri": "s3://models/../secrets"}, "spec.adapters[0].uri"),
    ({"uri": "http://models/a"}, "spec.adapters[0].uri"),
    ({"uri": "s3://UPPER/a"}, "spec.adapters[0].uri"),
    ({"uri": "s3://models/a", "claimName": "store"}, "spec.adapters[0]"),
])
def test_bad_sources_name_the_field(adapter, field):
    with pytest.raises(SpecError) as caught:
        parse_spec(_spec(adapter, volume={"claimName": "store"}))
    assert caught.value.field == field, caught.value


def test_a_path_without_claim_still_needs_one():
    with pytest.raises(SpecError) as caught:
        parse_spec(_spec({"uri": "s3://models/a"}))
    assert caught.value.field == "spec.output.claimName"


def test_crd_carries_the_exclusive_rule():
    from merge_worker.crd import crd_yaml

    assert "has(self.path) != has(self.uri)" in crd_yaml()
