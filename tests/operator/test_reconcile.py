"""The handlers' actions against an in-memory API: create once, adopt, retire, conflict-safe status."""

from __future__ import annotations

import asyncio
import copy

import kopf
import pytest

from adaptermerge_operator import names, reconcile
from adaptermerge_operator.kube import AlreadyExists, Conflict


class FakeApi:
    """Stores objects by (kind, name); `conflicts` makes that many status writes fail with 409."""

    def __init__(self, merge=None, conflicts=0):
        self.objects: dict[tuple[str, str], dict] = {}
        self.merge = merge
        self.conflicts = conflicts
        self.calls: list[str] = []

    async def run(self, fn, *args):
        return fn(*args)

    def create(self, obj):
        self.calls.append(f"create {obj['kind']} {obj['metadata']['name']}")
        key = (obj["kind"], obj["metadata"]["name"])
        if key in self.objects:
            raise AlreadyExists(key[1])
        self.objects[key] = copy.deepcopy(obj)
        return obj

    def get(self, kind, namespace, name):
        return self.objects.get((kind, name))

    def delete(self, kind, namespace, name):
        self.calls.append(f"delete {kind} {name}")
        return self.objects.pop((kind, name), None) is not None

    def get_merge(self, namespace, name):
        return copy.deepcopy(self.merge)

    def replace_merge_status(self, merge):
        self.calls.append("write status")
        if self.conflicts:
            self.conflicts -= 1
            self.merge["metadata"]["resourceVersion"] += "x"  # someone else wrote
            raise Conflict(merge["metadata"]["name"])
        self.merge = copy.deepcopy(merge)
        return merge


@pytest.fixture
def events(monkeypatch):
    posted = []
    monkeypatch.setattr(kopf, "event", lambda obj, *, type, reason, message="": posted.append((type, reason)))
    return posted


def context(api, settings, jobs=(), pods=()):
    return reconcile.Context(api=api, settings=settings, jobs={"uid-1234": list(jobs)}, pods={"uid-1234": list(pods)})


def job_in_index(name, generation, namespace="team"):
    return {"metadata": {"name": name, "namespace": namespace, "labels": {names.LABEL_GENERATION: str(generation)},
                         "finalizers": [names.FINALIZER]}, "status": {}}


def test_creates_the_configmap_before_the_job(objects, settings, events):
    api = FakeApi()
    assert asyncio.run(reconcile.ensure_job(context(api, settings), objects.merge()))
    assert api.calls == ["create ConfigMap dev-1", "create Job dev-1"]
    assert events == [("Normal", "JobCreated")]


def test_a_job_in_the_index_is_adopted_not_created(objects, settings, events):
    api = FakeApi()
    assert asyncio.run(reconcile.ensure_job(context(api, settings, jobs=[job_in_index("dev-1", 1)]), objects.merge()))
    assert api.calls == [] and events == []


def test_already_exists_is_adoption_when_the_job_is_ours(objects, settings, events):
    api = FakeApi()
    merge = objects.merge()
    asyncio.run(reconcile.ensure_job(context(api, settings), merge))
    events.clear()
    # The index has not seen the Job yet (e.g. its watch event is still on the way): create again.
    assert asyncio.run(reconcile.ensure_job(context(api, settings), merge))
    assert [c for c in api.calls if c.startswith("create Job")] == ["create Job dev-1", "create Job dev-1"]
    assert len([k for k in api.objects if k[0] == "Job"]) == 1 and events == []


def test_a_same_named_job_of_someone_else_is_never_taken_over(objects, settings, events):
    api = FakeApi()
    api.objects[("Job", "dev-1")] = {"metadata": {"name": "dev-1", "ownerReferences": [{"uid": "other"}]}}
    with pytest.raises(kopf.TemporaryError, match="does not belong"):
        asyncio.run(reconcile.ensure_job(context(api, settings), objects.merge()))
    assert api.objects[("Job", "dev-1")]["metadata"]["ownerReferences"] == [{"uid": "other"}]


def test_no_job_for_an_invalid_spec_or_a_finished_generation(objects, settings, events):
    api = FakeApi()
    invalid = objects.merge({**objects.SPEC, "method": "slerp", "adapters": objects.SPEC["adapters"] * 2})
    finished = objects.merge(status={"phase": "Succeeded", "observedGeneration": 1, "jobName": "dev-1"})
    for merge in (invalid, finished):
        assert not asyncio.run(reconcile.ensure_job(context(api, settings), merge))
    assert api.calls == []


def test_older_generations_are_retired_with_their_configmaps(objects, settings, events):
    api = FakeApi()
    for name in ("dev-1", "dev-2", "dev-3"):
        api.objects[("Job", name)] = api.objects[("ConfigMap", name)] = {}
    ctx = context(api, settings, jobs=[job_in_index(f"dev-{g}", g) for g in (1, 2, 3)])
    asyncio.run(reconcile.retire_superseded(ctx, objects.merge(generation=3)))
    assert sorted(api.objects) == [("ConfigMap", "dev-3"), ("Job", "dev-3")]
    assert events == [("Normal", "Superseded"), ("Normal", "Superseded")]


def test_status_write_retries_conflicts_and_keeps_kopf_bookkeeping(objects, settings, events):
    merge = objects.merge(status={"kopf": {"progress": {"reconcile_merge": {"retries": 1}}}})
    api = FakeApi(merge, conflicts=2)
    ctx = context(api, settings, jobs=[objects.job(startTime="2030-01-01T00:00:00Z")])
    asyncio.run(reconcile.refresh_status(ctx, "team", "dev", "uid-1234"))
    assert api.calls == ["write status"] * 3
    assert api.merge["status"]["phase"] == "Pending" and api.merge["status"]["jobName"] == "dev-1"
    assert api.merge["status"]["kopf"] == {"progress": {"reconcile_merge": {"retries": 1}}}
    assert events == [("Normal", "JobPending")]

    asyncio.run(reconcile.refresh_status(ctx, "team", "dev", "uid-1234"))  # nothing changed
    assert api.calls == ["write status"] * 3 and len(events) == 1


def test_status_of_a_replaced_resource_is_left_alone(objects, settings, events):
    api = FakeApi(objects.merge())
    asyncio.run(reconcile.refresh_status(context(api, settings), "team", "dev", "uid-of-a-deleted-one"))
    assert api.calls == []


def test_a_job_in_another_namespace_naming_this_uid_is_not_adopted(objects, settings, events):
    """The index is keyed by the uid a Job's labels and owner reference name, which anyone who may create
    Jobs can copy; one in another namespace is never taken for this resource's run."""
    api = FakeApi()
    forged = job_in_index("dev-1", 1, namespace="elsewhere")
    assert asyncio.run(reconcile.ensure_job(context(api, settings, jobs=[forged]), objects.merge()))
    assert api.calls == ["create ConfigMap dev-1", "create Job dev-1"]
