"""Issue 11, class 1: no byte outside the mapped volumes is ever opened. A symlink in an adapter or
base folder (or a dataset) that leads outside is refused before anything opens it, so nothing from the
outside file reaches a message or the result file. Linux inotify watches the outside files: an open of
any of them is a failure, whatever the exit code."""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
from pathlib import Path

import pytest

from merge_worker.inputs.volume_files import PathRefused, VolumeRoot

SECRET = "SECRET-7f3a9c"
IN_OPEN = 0x20


class OpenWatch:
    """Records opens of the watched files (inotify IN_OPEN), read without blocking."""

    def __init__(self):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0
        self.names: dict[int, str] = {}

    def watch(self, path: Path) -> None:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), IN_OPEN)
        assert wd >= 0, os.strerror(ctypes.get_errno())
        self.names[wd] = path.name

    def opened(self) -> list[str]:
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        seen, offset = [], 0
        while offset < len(data):
            wd, _, _, length = struct.unpack_from("iIII", data, offset)
            seen.append(self.names[wd])
            offset += 16 + length
        return seen

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def watch():
    w = OpenWatch()
    yield w
    w.close()


def _spec(**changes) -> dict:
    spec = {"adapters": [{"name": "a", "path": "adapters/a"}, {"name": "b", "path": "adapters/b"}],
            "method": "linear", "output": {"path": "merged/out"}}
    spec.update(changes)
    return spec


def _move_out(inside: Path, outside: Path, content: bytes | None = None) -> Path:
    """Moves `inside` to `outside` (optionally rewriting it) and leaves a symlink to it behind."""
    shutil.move(inside, outside)
    if content is not None:
        outside.write_bytes(content)
    os.symlink(outside, inside)
    return outside


def _assert_refused_unopened(run, watch, field: str) -> None:
    assert run.code == 2, run.err
    assert field in run.err and "leads outside its volume" in run.err, run.err
    assert SECRET not in run.err and SECRET not in run.out
    if run.result is not None:
        assert SECRET not in str(run.result) and run.result["exitCode"] == 2
    assert watch.opened() == []


@pytest.mark.parametrize("command", ["run", "validate"])
def test_adapter_config_linked_outside_is_never_opened(store, adaptermerge, tmp_path, watch, command):
    outside = _move_out(store / "adapters" / "b" / "adapter_config.json", tmp_path / "outside.json",
                        f'{{"r": "{SECRET}", "lora_alpha": 8}}'.encode())
    watch.watch(outside)
    _assert_refused_unopened(adaptermerge(command, _spec(), store), watch, "spec.adapters[1].path")


def test_adapter_weights_linked_outside_are_never_opened(store, adaptermerge, tmp_path, watch):
    outside = _move_out(store / "adapters" / "b" / "adapter_model.safetensors", tmp_path / "outside.safetensors")
    watch.watch(outside)
    _assert_refused_unopened(adaptermerge("run", _spec(), store), watch, "spec.adapters[1].path")


@pytest.mark.parametrize("name", ["model.safetensors.index.json", "config.json", "tokenizer.json"])
def test_base_files_linked_outside_are_never_opened(store, adaptermerge, tmp_path, watch, name):
    outside = _move_out(store / "models" / "tiny" / name, tmp_path / f"outside-{name}")
    watch.watch(outside)
    spec = _spec(baseModel={"path": "models/tiny"}, output={"path": "merged/out", "format": "merged-model"})
    _assert_refused_unopened(adaptermerge("run", spec, store), watch, "spec.baseModel.path")


def test_base_shard_linked_outside_is_never_opened(store, adaptermerge, tmp_path, watch):
    shard = sorted((store / "models" / "tiny").glob("model-*.safetensors"))[0]
    outside = _move_out(shard, tmp_path / "outside-shard.safetensors",
                        b"\x10\x00\x00\x00\x00\x00\x00\x00" + f'{{"{SECRET}":1}}'.encode()[:16])
    watch.watch(outside)
    spec = _spec(baseModel={"path": "models/tiny"}, output={"path": "merged/out", "format": "merged-model"})
    _assert_refused_unopened(adaptermerge("run", spec, store), watch, "spec.baseModel.path")


def test_dataset_linked_outside_is_never_opened(store, adaptermerge, tmp_path, watch):
    (store / "eval").mkdir()
    outside = tmp_path / "outside.jsonl"
    outside.write_text(f'{{"prompt": "{SECRET}", "completion": 1}}\n')
    os.symlink(outside, store / "eval" / "python.jsonl")
    watch.watch(outside)
    spec = _spec(baseModel={"path": "models/tiny"},
                 evaluation={"datasets": [{"name": "python", "path": "eval/python.jsonl", "adapter": "a"}]})
    _assert_refused_unopened(adaptermerge("validate", spec, store), watch, "spec.evaluation.datasets[0].path")


def test_a_link_inside_the_volume_is_followed(store, adaptermerge):
    # Hugging Face caches link each file to a blob elsewhere in the same tree; that stays allowed.
    blobs = store / "blobs"
    blobs.mkdir()
    config = store / "adapters" / "b" / "adapter_config.json"
    shutil.move(config, blobs / "b-config")
    os.symlink("../../blobs/b-config", config)
    assert adaptermerge("validate", _spec(), store).code == 0


def test_a_link_swapped_in_after_the_folder_was_checked_is_refused(store, tmp_path, watch):
    folder_path = store / "adapters" / "b"
    folder = VolumeRoot(store).open_folder("adapters/b", folder_path)
    outside = _move_out(folder_path / "adapter_config.json", tmp_path / "outside.json")
    watch.watch(outside)
    with pytest.raises(PathRefused, match="leads outside its volume"):
        folder.open("adapter_config.json")
    # The same for a folder of the path swapped for a link after the check.
    shutil.move(store / "adapters" / "a", tmp_path / "outside-a")
    os.symlink(tmp_path / "outside-a", store / "adapters" / "a")
    with pytest.raises(PathRefused, match="leads outside its volume"):
        VolumeRoot(store).open_file("adapters/a/adapter_config.json", store / "adapters" / "a")
    assert watch.opened() == []


@pytest.mark.parametrize("relative", ["adapters/b/../../..", "adapters/../../x", "adapters/b/adapter_config.json/.."])
def test_dotdot_cannot_climb_out_by_any_route(store, relative):
    with pytest.raises(PathRefused):
        VolumeRoot(store).open_file(relative, store / relative)


def test_a_fifo_is_never_opened(store, adaptermerge):
    # Opening a FIFO for reading would block forever; it is refused by type before any open.
    config = store / "adapters" / "b" / "adapter_config.json"
    config.unlink()
    os.mkfifo(config)
    run = adaptermerge("validate", _spec(), store)
    assert run.code == 2 and "adapter_config.json is not a file" in run.err
