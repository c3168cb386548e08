"""The platform admin's tenant policy (Helm values `policy`, docs/install.md "Tenant policy"), as the
operator enforces it before it creates a Job. The chart's ValidatingAdmissionPolicy enforces the same
rules at admission (charts/adaptermerge/templates/policy.yaml); this second check covers what admission
cannot see (PersistentVolumeClaim labels) and clusters where the admission policy is off or was
added after a resource.

Reaches the operator as one JSON environment variable, ADAPTERMERGE_POLICY; unset: no restrictions.
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from merge_worker.job_spec import Quantity, Toleration, quantity_value
from merge_worker.spec import AdapterMergeSpec

REASON = "PolicyViolation"


class ClaimPolicy(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    names: list[str] = Field(default_factory=list)
    """Claims merges may use; empty: any (enforced at admission and by the operator)."""
    match_labels: dict[str, str] = Field(default_factory=dict)
    """Labels every claim a merge uses must carry (the operator reads the claims: admission cannot)."""


class Policy(BaseModel):
    """None for a list means "not restricted" (the operator run without the chart); the chart always
    passes lists, where empty means "none allowed"."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    enabled: bool = True
    validation_actions: list[str] = Field(default_factory=lambda: ["Deny"])  # the chart's, for admission
    allowed_priority_classes: list[str] | None = None
    allowed_tolerations: list[Toleration] | None = None
    allowed_node_selectors: dict[str, list[str]] | None = None
    allow_affinity: bool = True
    allowed_resources: list[str] | None = None
    max_gpus: int | None = Field(default=None, ge=0)
    max_memory: Quantity | None = None
    claims: ClaimPolicy = Field(default_factory=ClaimPolicy)

    @field_validator("max_memory", mode="before")
    @classmethod
    def _unbounded(cls, value: Any) -> Any:
        return None if value == "" else value  # the chart's "no bound"

    @classmethod
    def from_json(cls, name: str, text: str) -> Policy:
        """Raises ValueError naming the variable and the field when the value is not a policy."""
        if not text.strip() or text.strip() == "null":
            return cls()
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"]) or "<value>"
            raise ValueError(f"{name}: {where}: {error['msg']}") from None


def covers(allowed: Toleration, wanted: Toleration) -> bool:
    """Whether every taint `wanted` tolerates is also tolerated by `allowed` (same rule as the
    admission policy's CEL): same key (or an allowed empty-key Exists), same value unless allowed
    is Exists, same effect unless allowed has none."""
    if allowed.key != wanted.key and not (allowed.key == "" and allowed.operator == "Exists"):
        return False
    if allowed.operator != "Exists" and (wanted.operator != "Equal" or wanted.value != allowed.value):
        return False
    return allowed.effect == "" or allowed.effect == wanted.effect


def _spec_violations(policy: Policy, spec: AdapterMergeSpec) -> list[str]:
    job, found = spec.job, []
    if policy.allowed_priority_classes is not None and job.priority_class_name and (
        job.priority_class_name not in policy.allowed_priority_classes
    ):
        found.append(f"spec.job.priorityClassName: {job.priority_class_name!r} is not allowed "
                     f"(allowed: {', '.join(policy.allowed_priority_classes) or 'none'})")
    if policy.allowed_tolerations is not None:
        for i, toleration in enumerate(job.tolerations):
            if not any(covers(a, toleration) for a in policy.allowed_tolerations):
                found.append(f"spec.job.tolerations[{i}]: tolerating {toleration.model_dump(exclude_unset=True)} "
                             "is not allowed by the cluster's policy")
    if policy.allowed_node_selectors is not None:
        for key, value in job.node_selector.items():
            if value not in policy.allowed_node_selectors.get(key, []):
                found.append(f"spec.job.nodeSelector.{key}: {value!r} is not allowed")
    if not policy.allow_affinity and job.affinity_dict():
        found.append("spec.job.affinity: not allowed by the cluster's policy")
    if policy.max_gpus is not None and job.gpus > policy.max_gpus:
        found.append(f"spec.job.gpus: {job.gpus} is more than the {policy.max_gpus} allowed")
    for section, resources in (("limits", job.resources.limits), ("requests", job.resources.requests)):
        for name, amount in resources.items():
            if policy.allowed_resources is not None and name not in policy.allowed_resources:
                found.append(f"spec.job.resources.{section}.{name}: not allowed "
                             f"(allowed: {', '.join(policy.allowed_resources) or 'none'})")
            elif name == "memory" and policy.max_memory is not None and (
                quantity_value(amount) > quantity_value(policy.max_memory)
            ):
                found.append(f"spec.job.resources.{section}.memory: {amount} is more than the {policy.max_memory} allowed")
    if policy.claims.names:
        for claim in spec.claims():
            if claim not in policy.claims.names:
                found.append(f"claim {claim!r} is not one merges may use")
    return found


def violations(policy: Policy, spec: AdapterMergeSpec, claim_labels: Mapping[str, Mapping[str, str] | None]) -> list[str]:
    """What the spec asks that the policy does not allow, each naming the field; [] when allowed.
    claim_labels: the labels of each claim the spec uses (None: no such claim), read by the caller
    only when policy.claims.match_labels asks for labels."""
    if not policy.enabled:
        return []
    found = _spec_violations(policy, spec)
    for claim in spec.claims() if policy.claims.match_labels else ():
        labels = claim_labels.get(claim)
        if labels is None:
            found.append(f"claim {claim!r}: no such PersistentVolumeClaim")
        elif any(labels.get(k) != v for k, v in policy.claims.match_labels.items()):
            wanted = ", ".join(f"{k}={v}" for k, v in policy.claims.match_labels.items())
            found.append(f"claim {claim!r} is not labelled for adaptermerge ({wanted})")
    return found


def memory_limit(policy: Policy, resources: dict[str, Any]) -> dict[str, Any]:
    """resources with a memory limit of max_memory when the spec sets none: a merge that names no
    limit still gets the policy's bound."""
    if not policy.enabled or policy.max_memory is None or "memory" in resources.get("limits", {}):
        return resources
    return {**resources, "limits": {**resources.get("limits", {}), "memory": policy.max_memory}}
