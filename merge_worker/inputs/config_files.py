"""Typed models of the JSON files the worker reads: a PEFT adapter_config.json, a base model's
config.json and model.safetensors.index.json. Only the fields the worker (or transformers, for the
base) relies on are typed; the rest is kept unread. Strict types: "16" is not a rank.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator

from merge_worker.inputs.patterns import MAX_KEY_LENGTH, MAX_PATTERN_KEYS, compile_key

MAX_RANK = 1 << 16
MAX_MODULES_TO_SAVE = 4096

# Text read from a file may end up in a message or the output's config: no control characters.
Text = Annotated[str, StringConstraints(max_length=4096, pattern=r"^[^\x00-\x1f\x7f]*$")]


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _compiles(key: str) -> str:
    try:
        compile_key(key)
    except (re.error, ValueError, RecursionError, OverflowError) as exc:
        raise ValueError(f"key {key[:80]!r} is not a valid regular expression ({type(exc).__name__})") from None
    return key


FiniteFloat = Annotated[float, AfterValidator(_finite)]
PatternKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_KEY_LENGTH,
                                             pattern=r"^[^\x00-\x1f\x7f]*$"), AfterValidator(_compiles)]


class _File(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class AdapterConfigFile(_File):
    peft_type: Text = "LORA"
    r: Annotated[int, Field(ge=1, le=MAX_RANK)]
    lora_alpha: FiniteFloat | None = None
    use_rslora: bool = False
    use_dora: bool | None = False
    bias: Text = "none"
    lora_bias: bool = False
    trainable_token_indices: Any = None
    rank_pattern: dict[PatternKey, Annotated[int, Field(ge=1, le=MAX_RANK)]] | None = Field(
        default=None, max_length=MAX_PATTERN_KEYS)
    alpha_pattern: dict[PatternKey, FiniteFloat] | None = Field(default=None, max_length=MAX_PATTERN_KEYS)
    modules_to_save: list[Text] | Text | None = Field(default=None, max_length=MAX_MODULES_TO_SAVE)
    base_model_name_or_path: Text | None = None
    fan_in_fan_out: bool = False
    task_type: Text | None = None

    @field_validator("rank_pattern", "alpha_pattern", mode="before")
    @classmethod
    def _few_keys(cls, value: Any) -> Any:
        # Counted before the keys are compiled one by one: a million keys are refused at once.
        if isinstance(value, dict) and len(value) > MAX_PATTERN_KEYS:
            raise ValueError(f"{len(value)} keys; at most {MAX_PATTERN_KEYS}")
        return value


class BaseConfigFile(_File):
    """config.json of a transformers model: what loading it for evaluation and copying it need."""

    model_type: Text
    architectures: list[Text] | None = Field(default=None, max_length=64)
    torch_dtype: Text | None = None
    dtype: Text | None = None
    vocab_size: Annotated[int, Field(ge=1, le=1 << 24)] | None = None
    hidden_size: Annotated[int, Field(ge=1, le=1 << 20)] | None = None
    num_hidden_layers: Annotated[int, Field(ge=1, le=1 << 12)] | None = None
    tie_word_embeddings: bool | None = None


class IndexFile(_File):
    """model.safetensors.index.json: which shard holds each tensor."""

    metadata: dict[str, Any] | None = None
    weight_map: dict[Annotated[str, StringConstraints(min_length=1, max_length=1024)],
                     Annotated[str, StringConstraints(min_length=1, max_length=255,
                                                      pattern=r"^[^/\x00-\x1f\x7f]+\.safetensors$")]] = \
        Field(max_length=1 << 20)

    def shards(self) -> list[str]:
        return list(dict.fromkeys(self.weight_map.values()))

