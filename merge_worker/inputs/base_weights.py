"""Lazy access to a base model's weights as transformers saves them: `model.safetensors`, or shards
listed in `model.safetensors.index.json`. Used for modules_to_save deltas and the merged-model output;
tensors are read one at a time, never the whole model.

Every file of the folder is opened once, beneath its volume (merge_worker.inputs.volume_files), and
read only through those fds; `folder` is a view of them for code that copies files by path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from merge_worker.inputs.errors import InputError
from merge_worker.inputs.config_files import BaseConfigFile, IndexFile
from merge_worker.inputs.json_files import JsonFileError, read_json_model
from merge_worker.inputs.safetensors_file import DTYPES, SafetensorsError, SafetensorsFile
from merge_worker.inputs.volume_files import InputFolder, PathRefused, VolumeRoot

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Any of these lets transformers build a tokenizer for the folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


class BaseWeightsError(InputError):
    """Unusable base model weights (a missing shard, an unreadable index); names the folder."""


class BaseWeights:
    def __init__(self, folder: InputFolder | Path):
        if not isinstance(folder, InputFolder):  # a plain path (tests) is its own volume
            folder = VolumeRoot(Path(folder)).open_folder(".", Path(folder))
        self.input = folder
        self.path = folder.path  # for messages
        try:
            view = folder.view()
        except PathRefused as exc:
            raise BaseWeightsError(self.path, str(exc)) from None
        self._view = view
        self.folder = view.path
        self._files = {f.name: f for f in view.files}
        if INDEX_FILE in self._files:
            try:
                shard_names = read_json_model(self._files[INDEX_FILE], IndexFile).shards()
            except JsonFileError as exc:
                raise BaseWeightsError(self.path, f"{INDEX_FILE}: {exc}") from None
        elif SINGLE_FILE in self._files:
            shard_names = [SINGLE_FILE]
        else:
            raise BaseWeightsError(
                self.path, f"no {SINGLE_FILE} or {INDEX_FILE} (the base model must be in safetensors)"
            )
        self.shards: list[Path] = []
        self._handles: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}  # tensor name -> shard file name, in file order
        for shard in shard_names:
            if shard not in self._files:
                raise BaseWeightsError(self.path, f"shard {shard} listed in {INDEX_FILE} is missing")
            try:
                handle = SafetensorsFile(self._files[shard])
            except (SafetensorsError, PathRefused) as exc:
                raise BaseWeightsError(self.path, f"{shard}: {exc}") from None
            self._handles[shard] = handle
            self.shards.append(self.folder / shard)
            for key in handle.keys():
                self._where[key] = shard

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._handles[self._where[name]].shape(name)

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].tensor(name)

    def dtype_code(self) -> str:
        """The checkpoint's floating-point dtype code (that of its first floating tensor), from headers."""
        for name, shard in self._where.items():
            code = self._handles[shard].dtype(name)
            if DTYPES[code].is_float:
                return code
        return "F32"

    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, DTYPES[self.dtype_code()].torch_name)

    def first_unusable(self, names: list[str] | None = None) -> tuple[str, str] | None:
        """(tensor, problem) for the first of `names` (default: every tensor) holding NaN or Inf."""
        for shard, handle in self._handles.items():
            keys = None if names is None else [n for n in names if self._where.get(n) == shard]
            try:
                bad = handle.first_unusable(keys)
            except PathRefused as exc:  # the file shrank while being read
                raise BaseWeightsError(self.path, f"{shard} {exc}") from None
            if bad is not None:
                return bad
        return None

    def check_loadable(self) -> None:
        """What loading the folder with transformers needs (evaluation, a merged-model output): a typed
        config.json and a tokenizer. Raises BaseWeightsError naming the file and field."""
        if CONFIG_FILE not in self._files:
            raise BaseWeightsError(self.path, f"no {CONFIG_FILE} (transformers cannot load the model)")
        try:
            read_json_model(self._files[CONFIG_FILE], BaseConfigFile)
        except JsonFileError as exc:
            raise BaseWeightsError(self.path, f"{CONFIG_FILE}: {exc}") from None

    def check_tokenizer(self) -> None:
        if not any(name in self._files for name in TOKENIZER_FILES):
            raise BaseWeightsError(self.path, f"no tokenizer (one of {', '.join(TOKENIZER_FILES)}); "
                                              "evaluation needs one")

    def files(self) -> list[Path]:
        """Every file of the folder a merged model copies or a manifest hashes (weights and the rest)."""
        return sorted(self.folder / name for name in self._files)
