"""Reads a small JSON input file (a config, an index) into a pydantic model, or fails naming the field.

Every failure is a `JsonFileError` whose message names the field at fault and what was wrong with it,
never the value found there: a message ends up in logs and the result file.
"""

from __future__ import annotations

import json
import re
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from merge_worker.inputs.volume_files import InputFile, PathRefused

MAX_JSON_BYTES = 16 << 20  # far above any real config or index
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNION_TAG = re.compile(r"^(?:(?:list|dict|tuple|set)\[.*\]|constrained-.*|function-.*|int|str|float|bool|none)$")
Model = TypeVar("Model", bound=BaseModel)


class JsonFileError(ValueError):
    """A malformed JSON input; the message starts with the field at fault."""


def read_json_model(file: InputFile, model: type[Model]) -> Model:
    try:
        raw = json.loads(file.read(MAX_JSON_BYTES))
    except PathRefused as exc:
        raise JsonFileError(str(exc)) from None
    except RecursionError:
        raise JsonFileError("nested too deeply") from None
    except ValueError as exc:
        position = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise JsonFileError(f"is not valid UTF-8 JSON{position}") from None
    if not isinstance(raw, dict):
        raise JsonFileError("must hold a JSON object")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise JsonFileError(describe_validation_error(exc)) from None
    except RecursionError:
        raise JsonFileError("nested too deeply") from None


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """'field.sub[2]: what is wrong (and N more problems)', without the offending input value."""
    errors = exc.errors(include_input=False, include_url=False)
    first = errors[0]
    where = prefix
    for part in first["loc"]:
        if isinstance(part, int):
            where += f"[{part}]"
        elif part == "[key]" or _UNION_TAG.match(str(part)):
            continue  # pydantic's labels for a dict key or a union's branch, meaningless to a user
        elif _NAME.match(str(part)):
            where += ("." if where else "") + str(part)
        else:  # a key from the file: quoted, shortened, control characters escaped
            text = str(part)
            where += f"[{(text[:60] + '...') if len(text) > 60 else text!r}]"
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where or '<top level>'}: {message}{more}"

