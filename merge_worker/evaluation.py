"""Scores a finished merge: does each skill survive it?

For every evaluation dataset (JSONL lines {"prompt", "completion"}) the mean loss over completion tokens
is measured three times: on the base model, on the dataset's source adapter, and on the merged output.
Retention = (L_base - L_merged) / (L_base - L_source): 1 keeps all the source adapter learned on that
skill, 0 keeps nothing. When the source is no better than the base, retention is undefined (None).

The completion is scored followed by the tokenizer's eos token (the model must also learn to stop, as
prompt-completion fine-tuning trains it), and the mean is token-weighted over the whole dataset, so it
does not depend on how examples are batched. The base is loaded once; adapters are attached with PEFT
and switched, never reloaded.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from merge_worker.eval_datasets import read_jsonl
from merge_worker.spec import AdapterMergeSpec

IGNORE = -100  # label of positions that are not scored (prompt, padding), as transformers uses it


# -- data ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]  # the completion's tokens, then eos when the tokenizer has one
    completion: str


def encode(tokenizer: Any, prompt: str, completion: str) -> Example:
    # Tokenized apart, so the prompt's tokens are exactly what generation starts from.
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    return Example(tuple(prompt_ids), tuple(completion_ids), completion)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE except on completion tokens)."""
    width = max(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids = e.prompt_ids + e.completion_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(e.prompt_ids) : len(ids)] = torch.tensor(e.completion_ids)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(examples: Sequence[Example], batch_size: int) -> Iterator[list[Example]]:
    # Similar lengths together waste less compute on padding; the token-weighted mean ignores order.
    ordered = sorted(examples, key=lambda e: len(e.prompt_ids) + len(e.completion_ids))
    for start in range(0, len(ordered), batch_size):
        yield ordered[start : start + batch_size]


# -- measurements -------------------------------------------------------------------------------------


@torch.no_grad()
def completion_loss(model: Any, examples: Sequence[Example], *, batch_size: int, pad_id: int,
                    device: torch.device) -> float:
    """Mean negative log-likelihood per completion token over all `examples`."""
    total, count = 0.0, 0
    for chunk in batches(examples, batch_size):
        batch = collate(chunk, pad_id)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        # Position t predicts token t+1; keep only the scored positions before the softmax (memory).
        targets = batch["labels"][:, 1:].to(device)
        scored = targets != IGNORE
        log_probs = logits[:, :-1][scored].float().log_softmax(dim=-1)
        total -= log_probs.gather(1, targets[scored].unsqueeze(1)).sum().item()
        count += int(scored.sum())
    return total / count


def still_possible(generated: str, expected: str) -> bool:
    """Whether text generated so far can still end up equal to `expected` (ignoring surrounding space)."""
    text, target = generated.lstrip(), expected.strip()
    if text.endswith("\ufffd"):
        return True  # a multi-byte character cut in half: undecided until its next token
    return target.startswith(text) or (text.startswith(target) and not text[len(target):].strip())


class StopWhenDecided:
    """Ends a row's greedy generation as soon as it can no longer match its expected completion: the
    verdict is the same as generating to the end, and wrong answers (most of a base model's) cost a
    token or two instead of max_new_tokens."""

    def __init__(self, tokenizer: Any, expected: Sequence[str], prompt_width: int):
        self.tokenizer, self.expected, self.prompt_width = tokenizer, expected, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        return torch.tensor([not still_possible(t, e) for t, e in zip(texts, self.expected)],
                            device=input_ids.device)


@torch.no_grad()
def exact_match_rate(model: Any, tokenizer: Any, examples: Sequence[Example], *, batch_size: int,
                     max_new_tokens: int, device: torch.device) -> float:
    """Fraction of examples whose greedy completion equals the expected one (surrounding space ignored)."""
    from transformers import StoppingCriteriaList

    hits = 0
    pad_id = tokenizer.pad_token_id
    for chunk in batches(examples, batch_size):
        width = max(len(e.prompt_ids) for e in chunk)
        # Left padding, so every row's generation starts right after its own prompt.
        input_ids = torch.tensor([[pad_id] * (width - len(e.prompt_ids)) + list(e.prompt_ids) for e in chunk])
        attention_mask = torch.tensor([[0] * (width - len(e.prompt_ids)) + [1] * len(e.prompt_ids) for e in chunk])
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([StopWhenDecided(tokenizer, [e.completion for e in chunk], width)]),
        )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        hits += sum(text.strip() == e.completion.strip() for text, e in zip(texts, chunk))
    return hits / len(examples)


def retention(base_loss: float, source_loss: float, merged_loss: float) -> float | None:
    """(L_base - L_merged) / (L_base - L_source); None when the source is no better than the base."""
    gain = base_loss - source_loss
    if not (gain > 0 and math.isfinite(gain) and math.isfinite(merged_loss)):
        return None
    return (base_loss - merged_loss) / gain


# -- scoring one model under several adapters ---------------------------------------------------------


class Scorer:
    """One loaded model (the base, later with PEFT adapters attached) and the measurements on it."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device, *, batch_size: int = 8,
                 max_new_tokens: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens

    def attach(self, name: str, adapter_dir: Path) -> None:
        """Loads a PEFT adapter under `name` (the first one wraps the model in a PeftModel)."""
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(adapter_dir), adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=name)
        self.model.eval()

    def detach(self, name: str) -> None:
        self.model.delete_adapter(name)

    def _using(self, adapter: str | None):
        """Context in which the model runs with `adapter` active, or as the bare base when None."""
        from contextlib import nullcontext

        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            if adapter is not None:
                raise ValueError(f"adapter {adapter!r} is not attached")
            return nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return nullcontext()

    def loss(self, examples: Sequence[Example], adapter: str | None = None) -> float:
        with self._using(adapter):
            return completion_loss(self.model, examples, batch_size=self.batch_size,
                                   pad_id=self.tokenizer.pad_token_id, device=self.device)

    def exact_match(self, examples: Sequence[Example], adapter: str | None = None) -> float:
        with self._using(adapter):
            return exact_match_rate(self.model, self.tokenizer, examples, batch_size=self.batch_size,
                                    max_new_tokens=self.max_new_tokens, device=self.device)


# -- the runner's entry point (docs/interfaces.md #4) ------------------------------------------------------------


def source_adapter_name(name: str) -> str:
    return f"source-{name}"  # never equal to MERGED, whatever the user named the adapter


MERGED = "merged"


def release_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def read_datasets(spec: AdapterMergeSpec, volumes: Any) -> dict[str, list[dict[str, str]]]:
    """Every evaluation dataset's rows, checked (SpecError naming the field) before any model loads."""
    assert spec.evaluation is not None
    datasets = {}
    for i, d in enumerate(spec.evaluation.datasets):
        field = f"spec.evaluation.datasets[{i}].path"
        datasets[d.name] = read_jsonl(volumes.open_file(spec, d, field), field, d.max_examples)
    return datasets


def evaluate_merge(spec: AdapterMergeSpec, volumes: Any, merged_dir: Path, device: torch.device,
                   log: Callable[[str], None]) -> dict[str, Any]:
    from merge_worker.model_loading import load_causal_lm, load_tokenizer

    assert spec.evaluation is not None and spec.base_model is not None
    started = time.monotonic()
    evaluation = spec.evaluation
    rows = read_datasets(spec, volumes)
    # Views: folders that read exactly the files validation checked (docs/cli.md, reading guarantees).
    base_path = volumes.view_of(spec, spec.base_model, "spec.baseModel.path")
    adapters = {a.name: (i, a) for i, a in enumerate(spec.adapters)}
    sources = {
        d.adapter: volumes.view_of(spec, adapters[d.adapter][1], f"spec.adapters[{adapters[d.adapter][0]}].path")
        for d in evaluation.datasets
    }

    tokenizer = load_tokenizer(base_path)
    examples = {name: [encode(tokenizer, r["prompt"], r["completion"]) for r in rs] for name, rs in rows.items()}
    log(f"evaluation: loading base {spec.base_model.path} (quantization {spec.base_model.quantization}) on {device}")
    loaded = load_causal_lm(base_path, spec.base_model.quantization, device, log)
    notes = [loaded.note] if loaded.note else []
    scorer = Scorer(loaded.model, tokenizer, device, batch_size=evaluation.batch_size,
                    max_new_tokens=evaluation.max_new_tokens)
    for name, path in sources.items():
        scorer.attach(source_adapter_name(name), path)

    results: dict[str, dict[str, Any]] = {}
    exact: dict[str, dict[str, float]] = {}
    for d in evaluation.datasets:
        data, source = examples[d.name], source_adapter_name(d.adapter)
        log(f"evaluation: {d.name}: base and source {d.adapter} on {len(data)} examples")
        results[d.name] = {"adapter": d.adapter, "examples": len(data),
                           "baseLoss": scorer.loss(data), "sourceLoss": scorer.loss(data, source)}
        if d.exact_match:
            exact[d.name] = {"base": scorer.exact_match(data), "source": scorer.exact_match(data, source)}

    merged_adapter: str | None = None
    quantization = loaded.quantization
    if spec.output.format == "adapter":
        scorer.attach(MERGED, merged_dir)
        merged_adapter = MERGED
    else:
        scorer.model = loaded = None  # one model in memory at a time
        release_memory(device)
        log("evaluation: loading the merged model")
        merged = load_causal_lm(merged_dir, spec.base_model.quantization, device)
        scorer.model, quantization = merged.model, merged.quantization
    for d in evaluation.datasets:
        data, result = examples[d.name], results[d.name]
        log(f"evaluation: {d.name}: merged output")
        result["mergedLoss"] = scorer.loss(data, merged_adapter)
        result["retention"] = retention(result["baseLoss"], result["sourceLoss"], result["mergedLoss"])
        if result["retention"] is None:
            notes.append(f"{d.name}: retention undefined, the source adapter is no better than the base there")
        result["exactMatch"] = None
        if d.exact_match:
            result["exactMatch"] = {**exact[d.name], "merged": scorer.exact_match(data, merged_adapter)}

    threshold = evaluation.min_retention
    below = [n for n, r in results.items() if threshold is not None and r["retention"] is not None
             and r["retention"] < threshold]
    if below:
        notes.append(f"retention below {threshold} on: {', '.join(below)}")
    return {
        "quantization": quantization,
        "note": "; ".join(notes),
        "seconds": round(time.monotonic() - started, 3),
        "minRetention": threshold,
        "passed": not below,
        "datasets": results,
    }
