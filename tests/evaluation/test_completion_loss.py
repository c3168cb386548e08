"""The evaluation's loss is the token-weighted mean NLL of completion tokens (plus eos), whatever the
batching: checked against an explicit log-softmax computed here, one unpadded example at a time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from evaluation.tiny_lm import CODE, EOS, SQL, VOCAB, token_ids

from merge_worker.evaluation.scoring import Scorer, Task, encode, exact_match_rate, generation_rows, still_possible
from merge_worker.evaluation.model_loading import load_causal_lm, load_tokenizer

CPU = torch.device("cpu")


def hand_loss(model, pairs) -> float:
    total, count = 0.0, 0
    for prompt, completion in pairs:
        prompt_ids = token_ids(prompt)
        ids = prompt_ids + token_ids(completion) + [EOS]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        log_probs = logits - logits.exp().sum(dim=-1, keepdim=True).log()
        for position in range(len(prompt_ids), len(ids)):  # every completion token and the eos
            total -= log_probs[position - 1, ids[position]].item()
            count += 1
    return total / count


@pytest.fixture(scope="module")
def base(tiny_store):
    path = tiny_store / "models" / "tiny"
    return load_causal_lm(path, "none", CPU).model, load_tokenizer(path)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_loss_equals_hand_computed_mean_over_completion_tokens(base, batch_size):
    model, tokenizer = base
    pairs = CODE + SQL  # different lengths, so batches of 3 and 8 are padded
    examples = [encode(tokenizer, p, c) for p, c in pairs]
    got = Scorer(model, tokenizer, CPU, batch_size=batch_size).loss(examples)
    assert got == pytest.approx(hand_loss(model, pairs), rel=1e-5)


def test_loss_is_token_weighted_not_a_mean_of_example_means(base):
    model, tokenizer = base
    short, long = ("question query", "select id"), ("question sum x", "return sum ( x )")  # 3 and 6 scored
    examples = [encode(tokenizer, *short), encode(tokenizer, *long)]
    got = Scorer(model, tokenizer, CPU).loss(examples)
    per_example = (hand_loss(model, [short]) + hand_loss(model, [long])) / 2
    weighted = (3 * hand_loss(model, [short]) + 6 * hand_loss(model, [long])) / 9
    assert got == pytest.approx(weighted, rel=1e-5)
    assert got != pytest.approx(per_example, rel=1e-5)


def test_adapter_switching_scores_each_adapter_and_the_bare_base(tiny_store, base):
    from peft import PeftModel

    path = tiny_store / "models" / "tiny"
    model, tokenizer = load_causal_lm(path, "none", CPU).model, load_tokenizer(path)
    examples = [encode(tokenizer, p, c) for p, c in CODE]
    scorer = Scorer(model, tokenizer, CPU, batch_size=2)
    scorer.attach("a", tiny_store / "adapters" / "code")
    scorer.attach("b", tiny_store / "adapters" / "sql")
    fresh_base = load_causal_lm(path, "none", CPU).model
    alone = PeftModel.from_pretrained(load_causal_lm(path, "none", CPU).model, tiny_store / "adapters" / "code")
    assert scorer.loss(examples) == pytest.approx(hand_loss(fresh_base, CODE), rel=1e-5)
    assert scorer.loss(examples, "a") == pytest.approx(hand_loss(alone, CODE), rel=1e-5)
    assert scorer.loss(examples, "a") < scorer.loss(examples)  # the trained adapter learned its skill


def greedy_by_hand(model, prompt: str, max_new_tokens: int) -> str:
    """Plain greedy decoding, one unpadded example, no cache, no stopping rule but eos."""
    ids = token_ids(prompt)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if next_id == EOS:
                break
            new.append(next_id)
    return " ".join(VOCAB[i] for i in new)


@pytest.mark.parametrize("adapter", [None, "code", "sql"])
def test_exact_match_equals_plain_greedy_decoding(tiny_store, adapter):
    from peft import PeftModel

    path = tiny_store / "models" / "tiny"
    model, tokenizer = load_causal_lm(path, "none", CPU).model, load_tokenizer(path)
    if adapter:
        model = PeftModel.from_pretrained(model, tiny_store / "adapters" / adapter)
    pairs = CODE + SQL  # each adapter knows half of them
    hits = sum(greedy_by_hand(model, p, 8).strip() == c for p, c in pairs)
    rate = exact_match_rate(model, tokenizer, [encode(tokenizer, p, c) for p, c in pairs], batch_size=3,
                            max_new_tokens=8, device=CPU)
    assert rate == hits / len(pairs)
    if adapter:
        assert 0 < hits < len(pairs)  # the comparison above saw both matches and misses


def causal_lm_copy(adapter: Path, folder: Path) -> Path:
    """The adapter saved as PEFT saves a causal-LM adapter (task_type CAUSAL_LM), which PEFT loads as
    PeftModelForCausalLM: the wrapper that takes an adapter per row."""
    shutil.copytree(adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"task_type": "CAUSAL_LM"}))
    return folder


def test_mixed_batches_score_each_row_with_its_own_adapter(tiny_store, tmp_path):
    """Rows of the bare base and of two adapters share batches (odd batch sizes split the tasks across
    batches); each task's loss and exact-match rate equal those of its model loaded on its own."""
    from peft import PeftModel, PeftModelForCausalLM

    path = tiny_store / "models" / "tiny"
    code = causal_lm_copy(tiny_store / "adapters" / "code", tmp_path / "code")
    sql = causal_lm_copy(tiny_store / "adapters" / "sql", tmp_path / "sql")
    tokenizer = load_tokenizer(path)
    scorer = Scorer(load_causal_lm(path, "none", CPU).model, tokenizer, CPU, batch_size=5, max_new_tokens=8,
                    mix_adapters=True)
    scorer.attach("code", code)
    scorer.attach("sql", sql)
    assert isinstance(scorer.model, PeftModelForCausalLM)
    assert scorer._mixed() and not Scorer(scorer.model, tokenizer, CPU)._mixed()  # mixing: CUDA's default only
    pairs = CODE + SQL
    examples = [encode(tokenizer, p, c) for p, c in pairs]
    tasks = [Task("base", examples), Task("code", examples, "code"), Task("sql", examples, "sql")]
    losses, rates = scorer.losses(tasks), scorer.exact_matches(tasks)
    for key, adapter in (("base", None), ("code", code), ("sql", sql)):
        alone = load_causal_lm(path, "none", CPU).model
        if adapter:
            alone = PeftModel.from_pretrained(alone, adapter)
        assert losses[key] == pytest.approx(hand_loss(alone, pairs), rel=1e-5), key
        hits = sum(greedy_by_hand(alone, p, 8).strip() == c for p, c in pairs)
        assert rates[key] == hits / len(pairs), key
    assert losses["code"] != pytest.approx(losses["sql"], rel=1e-3)  # the rows really saw different adapters


@pytest.mark.parametrize(
    ("generated", "expected", "possible"),
    [
        ("", "select id", True),
        (" sel", "select id", True),
        ("select id", "select id", True),
        ("select id  ", " select id", True),  # surrounding space is ignored
        ("select idx", "select id", False),
        ("select id x", "select id", False),
        ("from", "select id", False),
        ("caf\ufffd", "café", True),  # half a character: wait for the next token
    ],
)
def test_generation_stops_only_once_a_match_is_impossible(generated, expected, possible):
    assert still_possible(generated, expected) is possible


def test_generation_rows_fill_the_kv_cache_budget_on_a_gpu_only():
    cuda = torch.device("cuda")
    assert generation_rows(8, 160, CPU) == 8  # a CPU computes every row: batchSize
    assert generation_rows(8, 160, cuda) == 256  # short rows: the row cap
    assert generation_rows(8, 2048, cuda) == 32  # long rows: 65536 tokens of KV cache
    assert generation_rows(8, 100_000, cuda) == 8  # never below batchSize
