"""The spec's oci:// URIs and spec.registry: references checked with a message that says what is wrong,
an output only to a tag, the same rules in the CRD."""

from __future__ import annotations

import re

import pytest

from merge_worker.spec import OCI_URI, SpecError, parse_spec

DIGEST = "sha256:" + "ab" * 32


def _spec(adapter_uri: str, output_uri: str = "oci://reg.example.com:5000/out:v1", **extra) -> dict:
    return {"adapters": [{"name": "a", "uri": adapter_uri}], "method": "linear", "output": {"uri": output_uri},
            **extra}


@pytest.mark.parametrize("uri", [
    "oci://reg.example.com/adapters/a:v1", "oci://127.0.0.1:5000/a:latest", f"oci://reg.example.com/a/b/c@{DIGEST}",
    "oci://localhost:5000/team_x/my-adapter:v1.2-rc_3",
])
def test_oci_references_are_accepted(uri):
    spec = parse_spec(_spec(uri, registry={"credentialsSecret": "regcred", "insecure": True}))
    assert spec.adapters[0].uri == uri and spec.claims() == {}
    assert spec.registry.credentials_secret == "regcred" and spec.registry.insecure


@pytest.mark.parametrize(("uri", "words"), [
    ("oci://reg.example.com/a", "repository:tag"),  # neither tag nor digest
    ("oci://reg.example.com/Adapters:v1", "lowercase"),
    ("oci://reg.example.com/a/../b:v1", "repository:tag"),
    ("oci://reg.example.com/a@sha256:abc", "64 hex"),
    ("oci:///a:v1", "registry"),
])
def test_bad_oci_references_name_the_field(uri, words):
    with pytest.raises(SpecError) as caught:
        parse_spec(_spec(uri))
    assert caught.value.field == "spec.adapters[0].uri"
    assert words in str(caught.value) and "pattern" not in str(caught.value)


def test_an_oci_output_goes_to_a_tag():
    with pytest.raises(SpecError) as caught:
        parse_spec(_spec("oci://reg.example.com/a:v1", f"oci://reg.example.com/out@{DIGEST}"))
    assert caught.value.field == "spec.output.uri"


def test_crd_carries_the_oci_rules():
    from merge_worker.crd import crd_manifest, crd_yaml

    text = crd_yaml()
    assert "an oci:// output is pushed to a tag" in text
    schema = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    pattern = schema["properties"]["adapters"]["items"]["properties"]["uri"]["pattern"]
    assert re.fullmatch(pattern, "oci://reg.example.com/adapters/a:v1")
    assert re.fullmatch(pattern, "s3://bucket/a")
    assert not re.fullmatch(pattern, "oci://reg.example.com/a")
    assert pattern == f"^(s3://[a-z0-9][a-z0-9.-]{{1,61}}[a-z0-9](/[^\\x00-\\x1f]*)?|{OCI_URI})$"
    assert set(schema["properties"]["registry"]["properties"]) == {"credentialsSecret", "insecure", "pushLayout"}
