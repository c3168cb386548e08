"""Issue 11, class 4: whatever `run` refuses because of its inputs, `validate` refuses too, with the same
message, and `run` refuses it before merging (nothing written). `validate` works without torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from merge_worker.cli import main
from support.tiny_models import set_adapter_tensor

REPO = Path(__file__).resolve().parents[2]


def _spec_file(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump({"apiVersion": "adaptermerge.io/v1alpha1", "kind": "AdapterMerge",
                                    "metadata": {"name": "test"}, "spec": {"volume": {"claimName": "store"}, **spec}}))
    return path


def _spec(**changes) -> dict:
    spec = {"adapters": [{"name": "a", "path": "adapters/a"}, {"name": "b", "path": "adapters/b"}],
            "method": "linear", "output": {"path": "merged/out"}}
    spec.update(changes)
    return spec


def _both_refuse(adaptermerge, spec, store, *words: str) -> str:
    checked = adaptermerge("validate", spec, store)
    ran = adaptermerge("run", spec, store)
    for run in (checked, ran):
        assert run.code == 2, run.err
        assert "Traceback" not in run.err
        for word in words:
            assert word in run.err, f"{word!r} not in: {run.err}"
    assert checked.err == ran.err, "validate and run must refuse with the same message"
    assert ran.result["exitCode"] == 2 and ran.result["reason"] == "InvalidSpec"
    assert not (store / "merged").exists(), "run must refuse before writing anything"
    return checked.err


def _poison(dtype: torch.dtype, value: float):
    def change(t):
        t = t.to(dtype)
        t.view(-1)[5] = value
        return t

    return change


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_factors_in_every_float_dtype(store, adaptermerge, dtype, value):
    key = set_adapter_tensor(store / "adapters" / "b", "layers.1.self_attn.q_proj.lora_A", _poison(dtype, value))
    # float8 e4m3fn has no infinity: torch stores one as NaN.
    bad = "NaN" if value != value or dtype == torch.float8_e4m3fn else "Inf"
    _both_refuse(adaptermerge, _spec(), store, "spec.adapters[1].path", key, bad)


def test_float64_values_beyond_float32(store, adaptermerge):
    key = set_adapter_tensor(store / "adapters" / "b", "layers.0.self_attn.o_proj.lora_B",
                             _poison(torch.float64, 1e39))
    _both_refuse(adaptermerge, _spec(), store, "spec.adapters[1].path", key, "float32")


def test_integer_factors(store, adaptermerge):
    key = set_adapter_tensor(store / "adapters" / "b", "layers.0.self_attn.o_proj.lora_B",
                             lambda t: (t * 10).to(torch.int32))
    _both_refuse(adaptermerge, _spec(), store, "spec.adapters[1].path", key, "floating point")


def test_zero_size_factors(store, adaptermerge):
    set_adapter_tensor(store / "adapters" / "b", "layers.0.self_attn.o_proj.lora_B", lambda t: t[:0])
    set_adapter_tensor(store / "adapters" / "b", "layers.0.self_attn.o_proj.lora_A", lambda t: t[:, :0])
    _both_refuse(adaptermerge, _spec(), store, "spec.adapters[1].path", "model.layers.0.self_attn.o_proj", "empty")


def test_output_name_too_long_for_the_temporary_name(store, adaptermerge):
    name = "x" * 240  # a valid name (at most 255 bytes), but not with ".<name>.tmp-<random>" around it
    _both_refuse(adaptermerge, _spec(output={"path": f"merged/{name}"}), store, "spec.output.path",
                 "temporary name")


def test_output_under_a_file(store, adaptermerge):
    (store / "notes.txt").write_text("the user's file")
    err = _both_refuse(adaptermerge, _spec(output={"path": "notes.txt/out"}), store, "spec.output.path", "a file")
    assert (store / "notes.txt").read_text() == "the user's file"
    assert "notes.txt" in err


def test_evaluation_needs_a_tokenizer_in_the_base(store, adaptermerge):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (store / "models" / "tiny" / name).unlink(missing_ok=True)
    (store / "eval").mkdir()
    (store / "eval" / "a.jsonl").write_text('{"prompt": "x", "completion": "y"}\n')
    spec = _spec(baseModel={"path": "models/tiny"},
                 evaluation={"datasets": [{"name": "a", "path": "eval/a.jsonl", "adapter": "a"}]})
    _both_refuse(adaptermerge, spec, store, "spec.baseModel.path", "no tokenizer")


def _unwritable_result_files(tmp_path: Path) -> list[Path]:
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-folder").mkdir()
    paths = [tmp_path / "missing" / "result.json", tmp_path / "a-file" / "result.json", tmp_path / "a-folder"]
    read_only = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")  # refused even to root
    if read_only.exists():
        paths.append(read_only)
    return paths


def test_unwritable_result_file(store, tmp_path, capsys):
    spec_file = _spec_file(tmp_path / "merge.yaml", _spec())
    for result_file in _unwritable_result_files(tmp_path):
        codes = []
        for extra in ([], ["--device", "cpu"]):
            command = "run" if extra else "validate"
            capsys.readouterr()
            codes.append(main([command, str(spec_file), "--volume", f"store={store}", *extra,
                               "--result-file", str(result_file)]))
            err = capsys.readouterr().err
            assert "--result-file" in err and "Traceback" not in err, err
        assert codes == [2, 2], result_file
        assert not (store / "merged").exists()


# -- validate without torch --------------------------------------------------------------------------

BLOCKER = '''
import sys

class _NoWorkerLibraries:
    """Makes `import torch` (and the libraries built on it) fail, as in a base install."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"torch", "safetensors", "transformers", "peft", "accelerate"}:
            raise ImportError(f"{name} is not installed (blocked by the test)")
        return None

sys.meta_path.insert(0, _NoWorkerLibraries())
'''


def _validate_without_torch(tmp_path: Path, store: Path, spec: dict) -> tuple[subprocess.CompletedProcess, ...]:
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    spec_file = _spec_file(tmp_path / "merge.yaml", spec)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}
    blocked = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    return blocked, subprocess.run(
        [sys.executable, "-m", "merge_worker.cli", "validate", str(spec_file), "--volume", f"store={store}"],
        env=env, capture_output=True, text=True, timeout=300,
    )


def test_validate_works_without_torch(store, tmp_path):
    (store / "eval").mkdir()
    (store / "eval" / "a.jsonl").write_text('{"prompt": "x", "completion": "y"}\n')
    spec = _spec(adapters=[{"name": "a", "path": "adapters/a"}, {"name": "c", "path": "adapters/c"}],
                 baseModel={"path": "models/tiny"},
                 evaluation={"datasets": [{"name": "a", "path": "eval/a.jsonl", "adapter": "a"}]},
                 output={"path": "merged/out", "format": "merged-model"})
    blocked, checked = _validate_without_torch(tmp_path, store, spec)
    assert blocked.returncode != 0 and "blocked by the test" in blocked.stderr  # the blocker works
    assert checked.returncode == 0, checked.stderr
    assert "valid: 2 adapters" in checked.stdout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e5m2])
def test_validate_without_torch_finds_non_finite_values(store, tmp_path, dtype):
    key = set_adapter_tensor(store / "adapters" / "b", "layers.1.self_attn.q_proj.lora_A",
                             _poison(dtype, float("nan")))
    _, checked = _validate_without_torch(tmp_path, store, _spec())
    assert checked.returncode == 2, checked.stderr
    assert "spec.adapters[1].path" in checked.stderr and key in checked.stderr and "NaN" in checked.stderr


def test_a_small_adapter_declaring_a_huge_module_is_refused(store, adaptermerge):
    # 2 MiB of factors whose dense delta would be 2^32 float32 values (16 GiB): refused, never allocated.
    from safetensors.torch import save_file

    from support.tiny_models import edit_adapter_config

    folder = store / "adapters" / "b"
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{module}.lora_A.weight": torch.ones(1, 1 << 20, dtype=torch.bfloat16),
               f"{module}.lora_B.weight": torch.ones(1 << 12, 1, dtype=torch.bfloat16)},
              str(folder / "adapter_model.safetensors"))
    edit_adapter_config(folder, r=1, rank_pattern={}, alpha_pattern={})
    spec = _spec(adapters=[{"name": "b", "path": "adapters/b"}])
    _both_refuse(adaptermerge, spec, store, "spec.adapters[0].path", "model.layers.0.self_attn.q_proj",
                 "more than 2147483648 elements")


# -- a merged model's base: checked as the writer reads it (one read), refused the same way --------------


def _poison_base_tensor(store: Path, name_contains: str, dtype: torch.dtype, value: float) -> str:
    from safetensors.torch import load_file, save_file

    found = None
    for path in sorted((store / "models" / "tiny").glob("*.safetensors")):  # every shard in the dtype
        tensors = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in load_file(str(path)).items()}
        for key in sorted(tensors):
            if name_contains in key and found is None:
                tensors[key].view(-1)[3] = value
                found = key
        save_file(tensors, str(path), metadata={"format": "pt"})
    assert found is not None, name_contains
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tensor", ["layers.1.self_attn.q_proj.weight",  # a merged weight
                                    "embed_tokens.weight",                # copied unchanged
                                    "layers.0.input_layernorm.weight"])
def test_a_merged_models_non_finite_base_tensor_is_refused_like_validate(store, adaptermerge, dtype, tensor):
    key = _poison_base_tensor(store, tensor, dtype, float("nan"))
    spec = _spec(baseModel={"path": "models/tiny"}, output={"path": "merged/out", "format": "merged-model"})
    checked, ran = adaptermerge("validate", spec, store), adaptermerge("run", spec, store)

    def error(run) -> str:  # run has logged its progress before the writer met the tensor
        assert run.code == 2 and "Traceback" not in run.err, run.err
        return next(line for line in run.err.splitlines() if line.startswith("adaptermerge: error:"))

    assert error(checked) == error(ran), "validate and run must refuse with the same message"
    for word in ("spec.baseModel.path", key, "holds NaN"):
        assert word in error(ran)
    assert ran.result["exitCode"] == 2 and ran.result["reason"] == "InvalidSpec"
    assert not (store / "merged").exists(), "nothing written, no temporary folder left"


def test_a_merged_model_run_reads_the_base_weights_once(store, adaptermerge, monkeypatch):
    """`run` leaves the base's NaN/Inf scan to the writer, which checks each tensor as it reads it;
    `validate` (which writes nothing) still scans it all."""
    from merge_worker.inputs.safetensors_file import SafetensorsFile

    scans = []
    original = SafetensorsFile.first_unusable

    def recording(self, keys=None, *args, **kwargs):
        if "models" in Path(self.file.path).parts:  # the base's files, not the adapters'
            scans.append(keys)
        return original(self, keys, *args, **kwargs)

    monkeypatch.setattr(SafetensorsFile, "first_unusable", recording)
    spec = _spec(baseModel={"path": "models/tiny"}, output={"path": "merged/out", "format": "merged-model"})
    assert adaptermerge("validate", spec, store).code == 0
    assert None in scans, "validate scans every base tensor"
    scans.clear()
    ran = adaptermerge("run", spec, store)
    assert ran.code == 0, ran.err
    assert all(keys == [] for keys in scans), f"run scanned base tensors before writing: {scans}"
