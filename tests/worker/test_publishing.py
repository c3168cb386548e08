"""Publishing and its aftermath with real processes and signals: a run killed by SIGKILL (as the OOM
killer does) while merging, or just after swapping out the old output, leaves leftovers that the next
run for the same output removes; a live run's folder is never touched; a SIGTERM after the output is
published does not turn into "nothing was written"; the output is fsynced before the rename."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from support.merge_specs import LINEAR_TWO_ADAPTERS, with_output


SPEC = with_output(LINEAR_TWO_ADAPTERS, overwrite=True)

# Runs the real CLI in a child process, held at one point of the run until the test acts.
_HELD_RUN = """
import sys, time, pathlib
from merge_worker.cli import main
from merge_worker.output.adapter_writer import AdapterWriter
from merge_worker.output.publish import OutputSlot

ready, where, seconds = pathlib.Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])

def hold(original):
    def held(self, *args, **kwargs):
        if not ready.exists():
            ready.touch()
            time.sleep(seconds)
        return original(self, *args, **kwargs)
    return held

target = {"merging": (AdapterWriter, "add_module"), "published": (OutputSlot, "close")}[where]
setattr(target[0], target[1], hold(getattr(*target)))
sys.exit(main(sys.argv[4:]))
"""


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class HeldRun:
    def __init__(self, tmp_path: Path, store: Path, where: str, seconds: float = 600, *extra: str):
        spec_file = tmp_path / "held.yaml"
        spec_file.write_text(yaml.safe_dump({"apiVersion": "adaptermerge.io/v1alpha1", "kind": "AdapterMerge",
                                             "spec": {"volume": {"claimName": "store"}, **SPEC}}))
        self.ready = tmp_path / f"ready-{where}"
        self.result_file = tmp_path / f"result-{where}.json"
        self.process = subprocess.Popen(
            [sys.executable, "-c", _HELD_RUN, str(self.ready), where, str(seconds), "run", str(spec_file),
             "--volume", f"store={store}", "--device", "cpu", "--result-file", str(self.result_file), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while not self.ready.exists():
            assert self.process.poll() is None, self.process.communicate()
            assert time.monotonic() < deadline, "the child run never reached the point to hold at"
            time.sleep(0.1)

    def signal(self, sig: int) -> tuple[int, str]:
        self.process.send_signal(sig)
        _, err = self.process.communicate(timeout=120)
        return self.process.returncode, err

    def result(self) -> dict:
        return json.loads(self.result_file.read_text())


@pytest.fixture
def old_output(store) -> Path:
    out = store / "merged" / "out"
    out.mkdir(parents=True)
    (out / "previous.txt").write_text("the previous merge")
    return out


def test_sigkill_while_merging_leaves_leftovers_the_next_run_removes(store, adaptermerge, tmp_path):
    held = HeldRun(tmp_path, store, "merging")
    code, _ = held.signal(signal.SIGKILL)
    assert code == -signal.SIGKILL
    left = _listing(store / "merged")
    assert ".out.adaptermerge-lock" in left and any(n.startswith(".out.tmp-") for n in left), left

    run = adaptermerge("run", SPEC, store)
    assert run.code == 0, run.err
    assert _listing(store / "merged") == ["out"]
    assert "left by a run that was killed" in run.err


def test_sigkill_after_the_swap_leaves_the_old_output_which_the_next_run_removes(store, adaptermerge,
                                                                                 tmp_path, old_output):
    held = HeldRun(tmp_path, store, "published")
    assert held.signal(signal.SIGKILL)[0] == -signal.SIGKILL
    # The new output is in place; the old one sits in the temp folder's name.
    assert "merge-manifest.json" in _listing(old_output)
    swapped = [p for p in (store / "merged").iterdir() if p.name.startswith(".out.tmp-")]
    assert [_listing(p) for p in swapped] == [["previous.txt"]]

    run = adaptermerge("run", SPEC, store)
    assert run.code == 0, run.err
    assert _listing(store / "merged") == ["out"]


def test_a_live_run_is_a_conflict_and_its_folder_is_left_alone(store, adaptermerge, tmp_path):
    held = HeldRun(tmp_path, store, "merging")
    try:
        before = _listing(store / "merged")
        run = adaptermerge("run", SPEC, store)
        assert run.code == 2 and run.result["reason"] == "OutputConflict", run.err
        assert f"pid {held.process.pid}" in run.result["message"]
        assert _listing(store / "merged") == before
    finally:
        held.signal(signal.SIGKILL)


def test_a_new_generation_waits_for_its_previous_run_to_end(store, adaptermerge, tmp_path):
    import threading

    owner = "team-a/dev-assistant/1111-aaaa"
    held = HeldRun(tmp_path, store, "merging", 600, "--owner", owner)
    # The previous generation's pod is killed a little later, as the kubelet does after the grace period.
    killer = threading.Timer(2.0, held.process.kill)
    killer.start()
    try:
        run = adaptermerge("run", SPEC, store, "--owner", owner)
    finally:
        killer.cancel()
        held.process.kill()
        held.process.communicate()
    assert run.code == 0, run.err
    assert "waiting for the previous run of this resource" in run.err
    assert _listing(store / "merged") == ["out"]


def test_sigterm_after_publishing_reports_the_published_output(store, tmp_path, old_output):
    held = HeldRun(tmp_path, store, "published", seconds=3)
    code, err = held.signal(signal.SIGTERM)
    result = held.result()
    assert code == 0, err
    assert result["reason"] == "MergeSucceeded" and result["published"] is True
    assert "nothing was written" not in result["message"] and "SIGTERM arrived after" in result["message"]
    assert "merge-manifest.json" in _listing(old_output)
    assert _listing(store / "merged") == ["out"]  # the previous output was removed all the same


def test_sigterm_while_merging_writes_nothing(store, tmp_path, old_output):
    held = HeldRun(tmp_path, store, "merging")
    code, _ = held.signal(signal.SIGTERM)
    assert code == 1 and held.result()["message"] == "interrupted; nothing was written"
    assert _listing(old_output) == ["previous.txt"] and _listing(store / "merged") == ["out"]


def test_output_files_and_folders_are_fsynced_before_the_rename(store, adaptermerge, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    run = adaptermerge("run", {**SPEC, "output": {**SPEC["output"], "overwrite": False}}, store)
    assert run.code == 0, run.err
    out = store / "merged" / "out"
    tmp_names = {Path(p).parent.name for p in synced if Path(p).parent.name.startswith(".out.tmp-")}
    assert len(tmp_names) == 1, synced
    tmp = str(store / "merged" / tmp_names.pop())
    assert {Path(p).name for p in synced if Path(p).parent == Path(tmp)} == set(_listing(out))
    assert tmp in synced  # the folder itself, after its files
    assert synced.index(tmp) > max(i for i, p in enumerate(synced) if Path(p).parent == Path(tmp))
    assert synced[-1] == str(store / "merged")  # the parent, after the rename
