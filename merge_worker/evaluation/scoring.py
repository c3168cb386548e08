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

from merge_worker.evaluation.datasets import read_jsonl
from merge_worker.spec import AdapterMergeSpec, SpecError

IGNORE = -100  # label of positions that are not scored (prompt, padding), as transformers uses it
# Rows generated together on a GPU: at most GENERATION_ROWS, and at most GENERATION_TOKENS tokens of KV
# cache in all (about 0.13 MB per token at Llama-3.1-8B: 8.6 GB), so long prompts take fewer rows.
GENERATION_ROWS = 256
GENERATION_TOKENS = 1 << 16


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


@dataclass(frozen=True)
class Task:
    """One measurement: `examples` scored with `adapter` active (None: the bare base)."""

    key: Any
    examples: Sequence[Example]
    adapter: str | None = None


@dataclass(frozen=True)
class _Row:
    task: int
    example: Example
    adapter: str | None


AdapterContext = Callable[[str | None], Any]  # runs a batch of one adapter: a context manager


def _row_batches(tasks: Sequence[Task], batch_size: int, mixed: bool, length: Callable[[Example], int]
                 ) -> Iterator[list[_Row]]:
    """Every task's rows in batches of similar length. mixed: rows of different adapters may share a
    batch (PEFT runs each adapter on its rows); else every batch holds one adapter's rows."""
    rows = [_Row(i, e, t.adapter) for i, t in enumerate(tasks) for e in t.examples]
    key = (lambda r: length(r.example)) if mixed else (lambda r: (r.adapter or "", length(r.example)))
    batch: list[_Row] = []
    for row in sorted(rows, key=key):
        if batch and (len(batch) == batch_size or (not mixed and row.adapter != batch[0].adapter)):
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


def _run_batch(batch: list[_Row], mixed: bool, using: AdapterContext, fn: Callable[..., Any]) -> Any:
    """fn(**extra) with the batch's adapters active: per row through PEFT's adapter_names when mixed."""
    if mixed:
        return fn(adapter_names=[r.adapter or "__base__" for r in batch])
    with using(batch[0].adapter):
        return fn()


# -- measurements -------------------------------------------------------------------------------------


@torch.no_grad()
def completion_losses(model: Any, tasks: Sequence[Task], *, batch_size: int, pad_id: int, device: torch.device,
                      mixed: bool = False, using: AdapterContext | None = None) -> dict[Any, float]:
    """Mean negative log-likelihood per completion token of each task's examples."""
    totals, counts = [0.0] * len(tasks), [0] * len(tasks)
    length = lambda e: len(e.prompt_ids) + len(e.completion_ids)  # noqa: E731
    for chunk in _row_batches(tasks, batch_size, mixed, length):
        batch = collate([r.example for r in chunk], pad_id)
        logits = _run_batch(chunk, mixed, using or _no_adapters, lambda **extra: model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), **extra
        ).logits)
        # Position t predicts token t+1; keep only the scored positions before the softmax (memory).
        targets = batch["labels"][:, 1:].to(device)
        scored = targets != IGNORE
        log_probs = logits[:, :-1][scored].float().log_softmax(dim=-1)
        picked = log_probs.gather(1, targets[scored].unsqueeze(1)).squeeze(1)
        row_of = scored.nonzero()[:, 0]
        per_row = torch.zeros(len(chunk), dtype=torch.float64, device=picked.device)
        per_row.index_add_(0, row_of, picked.double())
        row_counts = scored.sum(dim=1).tolist()
        for row, total, count in zip(chunk, per_row.tolist(), row_counts):
            totals[row.task] -= total
            counts[row.task] += count
    return {t.key: total / count for t, total, count in zip(tasks, totals, counts)}


def completion_loss(model: Any, examples: Sequence[Example], *, batch_size: int, pad_id: int,
                    device: torch.device) -> float:
    """Mean negative log-likelihood per completion token over all `examples`."""
    return completion_losses(model, [Task(0, examples)], batch_size=batch_size, pad_id=pad_id, device=device)[0]


def _no_adapters(adapter: str | None):
    from contextlib import nullcontext

    if adapter is not None:
        raise ValueError(f"adapter {adapter!r} is not attached")
    return nullcontext()


def generation_rows(batch_size: int, longest: int, device: torch.device) -> int:
    """Rows per generation batch: batchSize on a CPU; on a GPU as many as GENERATION_ROWS and a KV cache of
    GENERATION_TOKENS allow for sequences of `longest` tokens (prompt + maxNewTokens), never fewer than
    batchSize."""
    if device.type != "cuda":
        return batch_size
    return max(batch_size, min(GENERATION_ROWS, GENERATION_TOKENS // max(longest, 1)))


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
def exact_match_rates(model: Any, tokenizer: Any, tasks: Sequence[Task], *, batch_size: int, max_new_tokens: int,
                      device: torch.device, mixed: bool = False, using: AdapterContext | None = None
                      ) -> dict[Any, float]:
    """Per task, the fraction of examples whose greedy completion equals the expected one (surrounding
    space ignored)."""
    from transformers import StoppingCriteriaList

    hits = [0] * len(tasks)
    pad_id = tokenizer.pad_token_id
    for chunk in _row_batches(tasks, batch_size, mixed, lambda e: len(e.prompt_ids)):
        examples = [r.example for r in chunk]
        width = max(len(e.prompt_ids) for e in examples)
        # Left padding, so every row's generation starts right after its own prompt.
        input_ids = torch.tensor([[pad_id] * (width - len(e.prompt_ids)) + list(e.prompt_ids) for e in examples])
        attention_mask = torch.tensor([[0] * (width - len(e.prompt_ids)) + [1] * len(e.prompt_ids)
                                       for e in examples])
        stop = StopWhenDecided(tokenizer, [e.completion for e in examples], width)
        out = _run_batch(chunk, mixed, using or _no_adapters, lambda **extra: model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id, stopping_criteria=StoppingCriteriaList([stop]), **extra,
        ))
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for row, text in zip(chunk, texts):
            hits[row.task] += text.strip() == row.example.completion.strip()
    return {t.key: h / len(t.examples) for t, h in zip(tasks, hits)}


def exact_match_rate(model: Any, tokenizer: Any, examples: Sequence[Example], *, batch_size: int,
                     max_new_tokens: int, device: torch.device) -> float:
    """Fraction of examples whose greedy completion equals the expected one (surrounding space ignored)."""
    return exact_match_rates(model, tokenizer, [Task(0, examples)], batch_size=batch_size,
                             max_new_tokens=max_new_tokens, device=device)[0]


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
                 max_new_tokens: int = 64, mix_adapters: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        # Mixed batches pay off on a GPU (one pass over the weights serves every row). On a CPU the cost
        # is per row and token: a base row that stops after a token or two would ride along in a batch of
        # rows that generate to the end, and PEFT runs each adapter's rows apart anyway (the demo's
        # evaluation took several times longer mixed). None: mix on CUDA only.
        self.mix_adapters = device.type == "cuda" if mix_adapters is None else mix_adapters

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

    def _mixed(self) -> bool:
        """Whether one batch may mix adapters: PEFT's causal-LM wrapper takes adapter_names per row."""
        from peft import PeftModelForCausalLM

        return self.mix_adapters and isinstance(self.model, PeftModelForCausalLM)

    def losses(self, tasks: Sequence[Task]) -> dict[Any, float]:
        return completion_losses(self.model, tasks, batch_size=self.batch_size, pad_id=self.tokenizer.pad_token_id,
                                 device=self.device, mixed=self._mixed(), using=self._using)

    def exact_matches(self, tasks: Sequence[Task]) -> dict[Any, float]:
        # Generation is bound by one pass over the weights per token, not by the rows: on a GPU the rows of
        # every task share batches as large as the KV cache allows, with a stop per row.
        longest = max((len(e.prompt_ids) for t in tasks for e in t.examples), default=0) + self.max_new_tokens
        return exact_match_rates(self.model, self.tokenizer, tasks,
                                 batch_size=generation_rows(self.batch_size, longest, self.device),
                                 max_new_tokens=self.max_new_tokens, device=self.device, mixed=self._mixed(),
                                 using=self._using)

    def loss(self, examples: Sequence[Example], adapter: str | None = None) -> float:
        return self.losses([Task(0, examples, adapter)])[0]

    def exact_match(self, examples: Sequence[Example], adapter: str | None = None) -> float:
        return self.exact_matches([Task(0, examples, adapter)])[0]


# -- the runner's entry point (docs/interfaces.md #4) ------------------------------------------------------------


def source_adapter_name(name: str) -> str:
    return f"source-{name}"  # never equal to MERGED, whatever the user named the adapter


MERGED = "merged"


def release_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _score(scorer: Scorer, datasets: Sequence[Any], examples: dict[str, list[Example]],
           roles: dict[str, str | None], phases: dict[str, float],
           ) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    """Losses and exact-match rates keyed (dataset, role); a role's adapter "source" means the dataset's
    own source adapter. Adds the seconds of each part to phases ("loss", "generate")."""
    def adapter(d: Any, role_adapter: str | None) -> str | None:
        return source_adapter_name(d.adapter) if role_adapter == "source" else role_adapter

    tasks, exact_tasks = [], []
    for d in datasets:
        for role, role_adapter in roles.items():
            tasks.append(Task((d.name, role), examples[d.name], adapter(d, role_adapter)))
            if d.exact_match:
                exact_tasks.append(tasks[-1])
    start = time.monotonic()
    losses = scorer.losses(tasks)
    phases["loss"] = phases.get("loss", 0.0) + time.monotonic() - start
    start = time.monotonic()
    exact = scorer.exact_matches(exact_tasks) if exact_tasks else {}
    phases["generate"] = phases.get("generate", 0.0) + time.monotonic() - start
    return losses, exact


def read_datasets(spec: AdapterMergeSpec, volumes: Any, part: str = "report") -> dict[str, list[dict[str, str]]]:
    """Every evaluation dataset's rows, checked (SpecError naming the field) before any model loads.
    Under spec.search only the rows of `part` (docs/search.md): the search selects on "search", the
    final evaluation reports on "report"."""
    assert spec.evaluation is not None
    datasets = {}
    for i, d in enumerate(spec.evaluation.datasets):
        field = f"spec.evaluation.datasets[{i}].path"
        datasets[d.name] = read_jsonl(volumes.open_file(spec, d, field), field, d.max_examples)
        if spec.search is not None:
            from merge_worker.search.split import split_part

            rows = split_part(datasets[d.name], part, spec.search.seed, spec.search.selection_fraction)
            if not rows:
                raise SpecError("spec.search.selectionFraction", f"the {part} split of dataset {d.name} is empty"
                                f" ({len(datasets[d.name])} examples, fraction {spec.search.selection_fraction})")
            datasets[d.name] = rows
    return datasets


def load_scorer(spec: AdapterMergeSpec, volumes: Any, device: torch.device, log: Callable[[str], None]
                ) -> tuple[Scorer, Any]:
    """The base model (quantized as asked) with every evaluation dataset's source adapter attached
    (source_adapter_name), and its load result (quantization, note)."""
    from merge_worker.evaluation.model_loading import load_causal_lm, load_tokenizer

    assert spec.evaluation is not None and spec.base_model is not None
    # Views: folders that read exactly the files validation checked (docs/cli.md, reading guarantees).
    base_path = volumes.view_of(spec, spec.base_model, "spec.baseModel.path")
    adapters = {a.name: (i, a) for i, a in enumerate(spec.adapters)}
    sources = {
        d.adapter: volumes.view_of(spec, adapters[d.adapter][1], f"spec.adapters[{adapters[d.adapter][0]}].path")
        for d in spec.evaluation.datasets
    }
    tokenizer = load_tokenizer(base_path)
    log(f"evaluation: loading base {spec.base_model.path} (quantization {spec.base_model.quantization}) on {device}")
    loaded = load_causal_lm(base_path, spec.base_model.quantization, device, log)
    scorer = Scorer(loaded.model, tokenizer, device, batch_size=spec.evaluation.batch_size,
                    max_new_tokens=spec.evaluation.max_new_tokens)
    for name, path in sources.items():
        scorer.attach(source_adapter_name(name), path)
    return scorer, loaded


def evaluate_merge(spec: AdapterMergeSpec, volumes: Any, merged_dir: Path, device: torch.device,
                   log: Callable[[str], None]) -> dict[str, Any]:
    from merge_worker.evaluation.model_loading import load_causal_lm

    assert spec.evaluation is not None and spec.base_model is not None
    started = time.monotonic()
    evaluation = spec.evaluation
    rows = read_datasets(spec, volumes)
    phases: dict[str, float] = {}
    scorer, loaded = load_scorer(spec, volumes, device, log)
    phases["load"] = time.monotonic() - started
    tokenizer = scorer.tokenizer
    examples = {name: [encode(tokenizer, r["prompt"], r["completion"]) for r in rs] for name, rs in rows.items()}
    notes = [loaded.note] if loaded.note else []

    merged_adapter: str | None = None
    quantization = loaded.quantization
    if spec.output.format == "adapter":
        scorer.attach(MERGED, merged_dir)
        merged_adapter = MERGED
    # Every (dataset, model) pair the loaded model can score, measured together: one set of batches
    # for all the losses and one for all the generations, mixing adapters within a batch.
    roles = {"base": None, "source": "source"} | ({"merged": merged_adapter} if merged_adapter else {})
    log(f"evaluation: {', '.join(roles)} on {', '.join(f'{d.name} ({len(examples[d.name])})' for d in evaluation.datasets)}")
    losses, exact = _score(scorer, evaluation.datasets, examples, roles, phases)
    if merged_adapter is None:
        scorer.model = loaded = None  # one model in memory at a time
        release_memory(device)
        log("evaluation: loading the merged model")
        merged = load_causal_lm(merged_dir, spec.base_model.quantization, device)
        scorer.model, quantization = merged.model, merged.quantization
        log("evaluation: merged model on every dataset")
        more_losses, more_exact = _score(scorer, evaluation.datasets, examples, {"merged": None}, phases)
        losses |= more_losses
        exact |= more_exact

    results: dict[str, dict[str, Any]] = {}
    for d in evaluation.datasets:
        result = results[d.name] = {"adapter": d.adapter, "examples": len(examples[d.name]),
                                    "baseLoss": losses[d.name, "base"], "sourceLoss": losses[d.name, "source"],
                                    "mergedLoss": losses[d.name, "merged"]}
        result["retention"] = retention(result["baseLoss"], result["sourceLoss"], result["mergedLoss"])
        if result["retention"] is None:
            notes.append(f"{d.name}: retention undefined, the source adapter is no better than the base there")
        result["exactMatch"] = None
        if d.exact_match:
            result["exactMatch"] = {role: exact[d.name, role] for role in ("base", "source", "merged")}

    threshold = evaluation.min_retention
    below = [n for n, r in results.items() if threshold is not None and r["retention"] is not None
             and r["retention"] < threshold]
    if below:
        notes.append(f"retention below {threshold} on: {', '.join(below)}")
    return {
        "quantization": quantization,
        "note": "; ".join(notes),
        "seconds": round(time.monotonic() - started, 3),
        "phaseSeconds": {k: round(v, 3) for k, v in phases.items()},  # load (with reading), loss, generate
        "minRetention": threshold,
        "passed": not below,
        "datasets": results,
    }
