"""Which output another AdapterMerge holds (operator/adaptermerge_operator/outputs.py), without a cluster:
paths on claims and keys in buckets (`uri`)."""

from __future__ import annotations

import pytest

from merge_worker.spec import parse_spec

from adaptermerge_operator import outputs

S3_SPEC = {
    "storage": {"endpoint": "http://s3.example:9000"},
    "adapters": [{"name": "a", "uri": "s3://adapters/a"}, {"name": "b", "uri": "s3://adapters/b"}],
    "method": "linear",
    "output": {"uri": "s3://merged/team/dev", "rank": 4},
}


def entry(objects, spec, *, name, namespace="team", uid=None, created="2030-01-01T00:00:00Z", status=None):
    merge = objects.merge(spec, name=name, status=status)
    merge["metadata"] |= {"namespace": namespace, "uid": uid or f"uid-{namespace}-{name}",
                          "creationTimestamp": created}
    return outputs.claim(merge)


def with_output(output, **storage):
    spec = {**S3_SPEC, "output": {**output, "rank": 4}}
    if storage:
        spec["storage"] = storage
    return spec


def test_a_uri_output_is_indexed_without_a_claim(objects):
    """A spec whose sources and output are all uris has no volume: it is still indexed (no crash)."""
    mine = entry(objects, S3_SPEC, name="dev")
    assert mine.location.shown == "s3://merged/team/dev" and mine.location.path == "team/dev"
    assert outputs.describe(parse_spec(S3_SPEC)) == "s3://merged/team/dev"


@pytest.mark.parametrize(("first", "second", "clash"), [
    ("s3://merged/team/dev", "s3://merged/team/dev", True),
    ("s3://merged/team/dev", "s3://merged/team/dev/", True),   # the same prefix
    ("s3://merged/team", "s3://merged/team/dev", True),        # one prefix inside the other
    ("s3://merged/team/dev", "s3://merged/team", True),
    ("s3://merged", "s3://merged/team/dev", True),             # the whole bucket holds everything
    ("s3://merged/team/dev", "s3://merged/team/dev2", False),  # a sibling, not inside
    ("s3://merged/team/dev", "s3://other/team/dev", False),    # another bucket
])
def test_uri_outputs_overlap_by_bucket_and_prefix(objects, first, second, clash):
    holder = entry(objects, with_output({"uri": first}), name="first", status={"phase": "Running"})
    mine = entry(objects, with_output({"uri": second}), name="second", created="2030-01-01T00:00:01Z")
    why = outputs.conflict(mine, [holder])
    assert bool(why) == clash, why
    if clash:
        assert why.startswith(f"spec.output: {second} is also the output of AdapterMerge first ({first})")


def test_a_bucket_is_shared_across_namespaces_but_a_claim_is_not(objects):
    s3_holder = entry(objects, S3_SPEC, name="first", namespace="other", status={"phase": "Succeeded",
                      "output": {"uri": "s3://merged/team/dev", "format": "adapter", "rank": 4}})
    mine = entry(objects, S3_SPEC, name="second", created="2030-01-01T00:00:01Z")
    assert "AdapterMerge other/first" in outputs.conflict(mine, [s3_holder])
    # Another endpoint is another store, even with the same bucket name.
    elsewhere = entry(objects, with_output({"uri": "s3://merged/team/dev"}, endpoint="http://s3.other:9000"),
                      name="third", created="2030-01-01T00:00:02Z")
    assert outputs.conflict(elsewhere, [s3_holder]) == ""
    # The same claim name in two namespaces is two PVCs.
    claim_holder = entry(objects, None, name="first", namespace="other", status={"phase": "Running"})
    claim_mine = entry(objects, None, name="second", created="2030-01-01T00:00:01Z")
    assert outputs.conflict(claim_mine, [claim_holder]) == ""
    same_namespace = entry(objects, None, name="first", status={"phase": "Running"})
    assert "store:merged/out" in outputs.conflict(claim_mine, [same_namespace])


def test_a_succeeded_uri_output_is_held_by_what_its_status_says_it_wrote(objects):
    # The holder's spec moved on to another prefix, but its succeeded run wrote s3://merged/team/dev.
    holder = entry(objects, with_output({"uri": "s3://merged/elsewhere"}), name="first", status={
        "phase": "Succeeded", "output": {"uri": "s3://merged/team/dev", "format": "adapter", "rank": 4}})
    mine = entry(objects, S3_SPEC, name="second", created="2030-01-01T00:00:01Z")
    assert "its merge succeeded into it" in outputs.conflict(mine, [holder])
    failed = entry(objects, S3_SPEC, name="first", status={"phase": "Failed"})
    assert outputs.conflict(mine, [failed]) == ""


def test_a_uri_and_a_claim_path_never_overlap(objects):
    holder = entry(objects, None, name="first", status={"phase": "Running"})  # store:merged/out
    mine = entry(objects, with_output({"uri": "s3://store/merged/out"}), name="second",
                 created="2030-01-01T00:00:01Z")
    assert outputs.conflict(mine, [holder]) == ""


def test_everyone_flattens_the_namespaced_index(objects):
    a, b = entry(objects, S3_SPEC, name="a"), entry(objects, S3_SPEC, name="b", namespace="other")
    assert outputs.everyone({"team": [a], "other": [b]}) == [a, b]
