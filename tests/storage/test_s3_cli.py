"""Merges through the real `adaptermerge` CLI whose adapters come from, and whose output goes to, a real
S3-compatible server (versitygw, tests/support/s3_server.py). Credentials come from the environment."""

from __future__ import annotations

import json

import pytest

from support.storage_cli import cli as _cli


def _spec(server, bucket: str, output: dict, **extra) -> dict:
    return {"storage": {"endpoint": server.endpoint, "credentialsSecret": "s3-credentials"},
            "adapters": [{"name": "a", "uri": f"s3://{bucket}/adapters/a"},
                         {"name": "b", "uri": f"s3://{bucket}/adapters/b"}],
            "method": "linear", "output": {"rank": 4, **output}, **extra}


def _objects(server, bucket: str, prefix: str) -> dict[str, bytes]:
    client = server.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def test_merge_from_bucket_to_bucket(s3_server, bucket, tiny_store, tmp_path):
    s3_server.upload_folder(tiny_store / "adapters", bucket, "adapters")
    code, log, result = _cli(tmp_path, _spec(s3_server, bucket, {"uri": f"s3://{bucket}/merged/ab"}),
                             s3_server.env())
    assert code == 0, log
    assert result["output"] == {"uri": f"s3://{bucket}/merged/ab", "format": "adapter"}
    objects = _objects(s3_server, bucket, "merged/ab/")
    assert set(objects) == {f"merged/ab/{n}" for n in
                            ("adapter_config.json", "adapter_model.safetensors", "merge-manifest.json")}
    manifest = json.loads(objects["merged/ab/merge-manifest.json"])
    assert manifest["spec"]["adapters"][0]["uri"] == f"s3://{bucket}/adapters/a"
    sources = {s["uri"]: s["files"] for s in manifest["sources"]}
    import hashlib

    local = tiny_store / "adapters" / "a" / "adapter_model.safetensors"
    entry = sources[f"s3://{bucket}/adapters/a"]["adapter_model.safetensors"]
    assert entry["sha256"] == hashlib.sha256(local.read_bytes()).hexdigest()
    assert entry["size"] == local.stat().st_size
    # No credential in the log, the manifest or the result file.
    for text in (log, objects["merged/ab/merge-manifest.json"].decode(), json.dumps(result)):
        assert s3_server.access_key not in text and s3_server.secret_key not in text

    # The output exists now: a second run is refused before merging, unless overwrite is set.
    code, log, result = _cli(tmp_path, _spec(s3_server, bucket, {"uri": f"s3://{bucket}/merged/ab"}),
                             s3_server.env())
    assert code == 2 and result["field"] == "spec.output.uri", log
    assert _objects(s3_server, bucket, "merged/ab/") == objects
    s3_server.client().put_object(Bucket=bucket, Key="merged/ab/stale.bin", Body=b"old")
    code, log, result = _cli(tmp_path, _spec(s3_server, bucket, {"uri": f"s3://{bucket}/merged/ab",
                                                                 "overwrite": True}), s3_server.env())
    assert code == 0, log
    replaced = _objects(s3_server, bucket, "merged/ab/")
    assert set(replaced) == set(objects)  # the old output's stray object is gone
    assert replaced["merged/ab/adapter_model.safetensors"] == objects["merged/ab/adapter_model.safetensors"]


def test_bucket_adapters_to_a_volume(s3_server, bucket, tiny_store, tmp_path):
    s3_server.upload_folder(tiny_store / "adapters", bucket, "adapters")
    out = tmp_path / "out"
    out.mkdir()
    spec = _spec(s3_server, bucket, {"path": "merged", "claimName": "out"})
    scratch = tmp_path / "scratch"  # TMPDIR: where the downloads are staged
    scratch.mkdir()
    code, log, _ = _cli(tmp_path, spec, s3_server.env(TMPDIR=str(scratch)), extra=("--volume", f"out={out}"))
    assert code == 0, log
    manifest = json.loads((out / "merged" / "merge-manifest.json").read_text())
    assert [s["uri"] for s in manifest["sources"]] == [f"s3://{bucket}/adapters/a", f"s3://{bucket}/adapters/b"]
    assert manifest["inputs"][0]["files"]["adapter_model.safetensors"] == (
        manifest["sources"][0]["files"]["adapter_model.safetensors"]["sha256"])
    assert list(scratch.iterdir()) == []  # the downloads are removed after the run


@pytest.mark.parametrize(("case", "field"), [
    ("missing-object", "spec.adapters[1].uri"),
    ("missing-bucket", "spec.adapters[0].uri"),
    ("wrong-secret", "spec.adapters[0].uri"),
    ("no-credentials", "spec.adapters[0].uri"),
    ("bad-uri", "spec.adapters[0].uri"),
])
def test_bad_sources_exit_2_naming_the_field(s3_server, bucket, tiny_store, tmp_path, case, field):
    s3_server.upload_folder(tiny_store / "adapters" / "a", bucket, "adapters/a")
    spec = _spec(s3_server, bucket, {"uri": f"s3://{bucket}/merged"})
    env = s3_server.env()
    if case == "missing-bucket":
        spec["adapters"][0]["uri"] = "s3://no-such-bucket/adapters/a"
    elif case == "wrong-secret":
        env = s3_server.env(AWS_SECRET_ACCESS_KEY="not-" + s3_server.secret_key)
    elif case == "no-credentials":
        env = {"AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    elif case == "bad-uri":
        spec["adapters"][0]["uri"] = f"s3://{bucket}/../adapters/a"
    code, log, result = _cli(tmp_path, spec, env)
    assert code == 2, log
    assert result["field"] == field, result
    assert field in log
    assert s3_server.secret_key not in log + json.dumps(result)
    assert _objects(s3_server, bucket, "merged") == {}


def test_download_bound(s3_server, bucket, tiny_store, tmp_path):
    s3_server.upload_folder(tiny_store / "adapters", bucket, "adapters")
    spec = _spec(s3_server, bucket, {"uri": f"s3://{bucket}/merged"})
    spec["storage"]["maxDownloadBytes"] = 1000
    code, log, result = _cli(tmp_path, spec, s3_server.env(), command="validate")
    assert code == 2 and "spec.adapters[0].uri" in log and "maxDownloadBytes" in log, log
    assert result is None  # validate writes no result file
    spec["storage"]["maxDownloadBytes"] = 1 << 30
    code, log, result = _cli(tmp_path, spec, s3_server.env(), command="validate")
    assert code == 0 and f"output adapter at s3://{bucket}/merged" in log, log


def test_base_model_from_bucket_into_a_merged_model(s3_server, bucket, tiny_store, tmp_path):
    s3_server.upload_folder(tiny_store / "adapters", bucket, "adapters")
    s3_server.upload_folder(tiny_store / "models" / "tiny", bucket, "models/tiny")
    spec = _spec(s3_server, bucket, {"uri": f"s3://{bucket}/merged/full", "format": "merged-model"},
                 baseModel={"uri": f"s3://{bucket}/models/tiny"})
    del spec["output"]["rank"]
    code, log, result = _cli(tmp_path, spec, s3_server.env())
    assert code == 0, log
    objects = _objects(s3_server, bucket, "merged/full/")
    assert "merged/full/config.json" in objects
    manifest = json.loads(objects["merged/full/merge-manifest.json"])
    base = next(s for s in manifest["sources"] if s["field"] == "spec.baseModel")
    assert base["uri"] == f"s3://{bucket}/models/tiny" and "config.json" in base["files"]


def test_an_object_that_does_not_match_its_etag_is_refused(s3_server, bucket, tiny_store, tmp_path):
    s3_server.upload_folder(tiny_store / "adapters", bucket, "adapters")
    # Same size, other bytes, written behind the server's back: its stored ETag no longer matches.
    stored = s3_server.data / bucket / "adapters" / "b" / "adapter_model.safetensors"
    content = bytearray(stored.read_bytes())
    content[-1] ^= 0xFF
    stored.write_bytes(bytes(content))
    code, log, result = _cli(tmp_path, _spec(s3_server, bucket, {"uri": f"s3://{bucket}/merged"}),
                             s3_server.env())
    assert code == 2 and result["field"] == "spec.adapters[1].uri", log
    assert "ETag" in result["message"]
    assert _objects(s3_server, bucket, "merged") == {}


def test_evaluation_dataset_is_one_object(s3_server, bucket, tiny_store, tmp_path):
    s3_server.upload_folder(tiny_store / "adapters", bucket, "adapters")
    s3_server.upload_folder(tiny_store / "models" / "tiny", bucket, "models/tiny")
    s3_server.client().put_object(Bucket=bucket, Key="eval/a.jsonl",
                                  Body=b'{"prompt": "x", "completion": "y"}\n{"prompt": 3}\n')
    spec = _spec(s3_server, bucket, {"uri": f"s3://{bucket}/merged"},
                 baseModel={"uri": f"s3://{bucket}/models/tiny"},
                 evaluation={"datasets": [{"name": "a", "adapter": "a", "uri": f"s3://{bucket}/eval/a.jsonl"}]})
    # The reader's own error about the downloaded file names the spec's uri field, not the scratch path.
    code, log, _ = _cli(tmp_path, spec, s3_server.env(), command="validate")
    assert code == 2 and "spec.evaluation.datasets[0].uri" in log and "line 2" in log, log
    s3_server.client().put_object(Bucket=bucket, Key="eval/a.jsonl", Body=b'{"prompt": "x", "completion": "y"}\n')
    code, log, _ = _cli(tmp_path, spec, s3_server.env(), command="validate")
    assert code == 0, log
    spec["evaluation"]["datasets"][0]["uri"] = f"s3://{bucket}/eval/missing.jsonl"
    code, log, _ = _cli(tmp_path, spec, s3_server.env(), command="validate")
    assert code == 2 and "spec.evaluation.datasets[0].uri" in log and "not found" in log, log


def test_owner_decides_who_replaces_an_s3_output(s3_server, bucket, tiny_store, tmp_path):
    """--owner on an s3:// output: the rule of a volume output (merge_worker/output/ownership.py)."""
    s3_server.upload_folder(tiny_store / "adapters", bucket, "adapters")
    uri = f"s3://{bucket}/merged/owned"
    first, other = "team/first/uid-1", "team/second/uid-2"
    code, log, _ = _cli(tmp_path, _spec(s3_server, bucket, {"uri": uri}), s3_server.env(), extra=("--owner", first))
    assert code == 0, log
    written = _objects(s3_server, bucket, "merged/owned/")
    assert json.loads(written["merged/owned/merge-manifest.json"])["owner"]["uid"] == "uid-1"

    # Another resource may not replace it, not even with overwrite: exit 2, OutputConflict, nothing deleted.
    for command in ("validate", "run"):
        code, log, result = _cli(tmp_path, _spec(s3_server, bucket, {"uri": uri, "overwrite": True}),
                                 s3_server.env(), command=command, extra=("--owner", other))
        assert code == 2, log
        assert "team/first (uid uid-1)" in log and "spec.output.uri" in log, log
        if command == "run":
            assert (result["reason"], result["field"]) == ("OutputConflict", "spec.output.uri"), result
        assert _objects(s3_server, bucket, "merged/owned/") == written

    # The same resource (a later generation) replaces its own output without overwrite.
    spec = _spec(s3_server, bucket, {"uri": uri})
    spec["method"] = "ties"
    spec["parameters"] = {"density": 0.5}
    code, log, result = _cli(tmp_path, spec, s3_server.env(), extra=("--owner", first))
    assert code == 0, log
    assert result["message"].endswith(f"into {uri}"), result  # the uri, not the scratch folder
    replaced = _objects(s3_server, bucket, "merged/owned/")
    assert json.loads(replaced["merged/owned/merge-manifest.json"])["spec"]["method"] == "ties"

    # Objects without a manifest belong to no one: overwrite decides, as without --owner.
    s3_server.client().put_object(Bucket=bucket, Key="merged/loose/data.bin", Body=b"x")
    loose = _spec(s3_server, bucket, {"uri": f"s3://{bucket}/merged/loose"})
    code, log, result = _cli(tmp_path, loose, s3_server.env(), extra=("--owner", other))
    assert code == 2 and result["reason"] == "InvalidSpec" and "overwrite" in result["message"], log
    loose["output"]["overwrite"] = True
    code, log, _ = _cli(tmp_path, loose, s3_server.env(), extra=("--owner", other))
    assert code == 0, log
    assert "merged/loose/data.bin" not in _objects(s3_server, bucket, "merged/loose/")


def test_an_output_that_changes_hands_during_the_merge_is_not_replaced(s3_server, bucket, tmp_path, monkeypatch):
    """The destination is checked again just before the push: another resource's output that appeared
    meanwhile is left alone (OutputConflict, exit 2) and nothing of it is deleted."""
    from merge_worker.output.ownership import OutputConflict, Owner
    from merge_worker.spec import Storage
    from merge_worker.storage.client import make_client
    from merge_worker.storage.upload import push

    built = tmp_path / "built"
    built.mkdir()
    (built / "adapter_model.safetensors").write_bytes(b"new")
    (built / "merge-manifest.json").write_text(json.dumps({"owner": {"namespace": "team", "name": "first",
                                                                     "uid": "uid-1"}}))
    theirs = {"merged/x/merge-manifest.json": json.dumps({"owner": {"namespace": "team", "name": "second",
                                                                    "uid": "uid-2"}}).encode(),
              "merged/x/adapter_model.safetensors": b"theirs"}
    for key, body in theirs.items():
        s3_server.client().put_object(Bucket=bucket, Key=key, Body=body)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    client = make_client(Storage(endpoint=s3_server.endpoint))
    with pytest.raises(OutputConflict, match="team/second"):
        push(client, built, f"s3://{bucket}/merged/x", True, Owner("team", "first", "uid-1"))
    assert _objects(s3_server, bucket, "merged/x/") == theirs
