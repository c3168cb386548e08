"""What every spec model shares: the model configuration and the CEL rules the CRD carries.

Field names are camelCase in YAML (Python attributes are snake_case); unknown fields are errors; the
docstring under each field is its description, which the generated CRD carries to `kubectl explain`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


def cel_rules(*rules: tuple[str, str]) -> dict[str, Any]:
    """CEL rules the CRD carries for what the schema alone cannot say (read by merge_worker.crd)."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": msg} for rule, msg in rules]}


class SpecModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True,
        use_attribute_docstrings=True,
    )
