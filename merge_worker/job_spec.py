"""`spec.job`: the Kubernetes settings of a merge's Job, validated as strictly as the API server will
validate the Job the operator makes from them, so a spec the CRD accepts is never refused later.

Each rule is checked twice from one declaration: by pydantic (CLI, worker, operator) and, through
patterns and the CEL rules of `_cel`, by the CRD at `kubectl apply`. Pure pydantic: no torch, no
Kubernetes client.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, ConfigDict, Field, StringConstraints, model_validator

from merge_worker.spec_base import SpecModel as _Model
from merge_worker.spec_base import cel_rules as _cel

# -- Kubernetes name and value syntax (k8s.io/apimachinery/pkg/util/validation) ---------------------

DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_SUBDOMAIN = rf"{DNS_LABEL}(\.{DNS_LABEL})*"
# A label key or resource name: an optional DNS-subdomain prefix and '/', then a name of <= 63 chars.
QUALIFIED_NAME = rf"^({DNS_SUBDOMAIN}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# resource.Quantity without a sign: requests and limits must not be negative.
QUANTITY = (
    r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE][-+]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# Resource names that need no domain prefix; anything else is an extended resource (e.g. a GPU).
STANDARD_RESOURCES = ("cpu", "memory", "ephemeral-storage")
MAX_ITEMS = 16  # list bounds: far above real use, and they keep the CRD's CEL cost estimate low


def _qualified_name_ok(value: str) -> bool:
    prefix, _, name = value.rpartition("/")
    return len(name) <= 63 and len(prefix) <= 253 and re.match(QUALIFIED_NAME, value) is not None


def _qualified(value: str) -> str:
    if not _qualified_name_ok(value):
        raise ValueError(
            f"{value!r} is not a qualified name (an optional DNS-subdomain prefix and '/', then at most "
            "63 characters: alphanumerics, '-', '_' or '.', starting and ending alphanumeric)"
        )
    return value


# The pattern bounds the name part (63); pydantic also checks the prefix's 253, the CRD only the total.
QualifiedName = Annotated[str, StringConstraints(max_length=317, pattern=QUALIFIED_NAME), AfterValidator(_qualified)]
LabelValue = Annotated[str, StringConstraints(max_length=63, pattern=LABEL_VALUE)]
DnsSubdomain = Annotated[str, StringConstraints(max_length=253, pattern=rf"^{DNS_SUBDOMAIN}$")]
# Kueue queue names are DNS subdomains and become a label value: at most 63 characters.
QueueName = Annotated[str, StringConstraints(max_length=63, pattern=rf"^{DNS_SUBDOMAIN}$")]
QuantityString = Annotated[str, StringConstraints(max_length=64, pattern=QUANTITY)]
Quantity = Union[Annotated[int, Field(ge=0)], QuantityString]

_SUFFIXES = {
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
    "P": Decimal("1e15"), "E": Decimal("1e18"),
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}


def quantity_value(quantity: int | str) -> Decimal:
    """The number a Kubernetes quantity stands for ("1.5Gi" -> 1610612736); for comparisons."""
    text = str(quantity).lstrip("+")
    match = re.fullmatch(r"([0-9.]+)([eE][-+]?[0-9.]+|[KMGTPE]i|[numkMGTPE])?", text)
    if match is None:
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity")
    number, suffix = match.group(1), match.group(2) or ""
    if suffix[:1] in ("e", "E"):
        return Decimal(number + suffix)
    return Decimal(number) * _SUFFIXES[suffix]


# -- resources ------------------------------------------------------------------------------------

ResourceList = Annotated[
    dict[QualifiedName, Quantity],
    Field(
        max_length=MAX_ITEMS,
        json_schema_extra=_cel((
            "self.all(k, k.contains('/') || k in ['cpu', 'memory', 'ephemeral-storage'] || k.startsWith('hugepages-'))",
            "resource names without a domain prefix must be cpu, memory, ephemeral-storage or hugepages-<size>",
        )),
    ),
]


class Resources(_Model):
    """Requests and limits of the worker container (Kubernetes ResourceRequirements)."""

    model_config = ConfigDict(json_schema_extra=_cel(
        ("!has(self.requests) || self.requests.all(k, !has(self.limits) || !(k in self.limits)"
         " || quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) <= 0)",
         "a request must not exceed its limit"),
        ("!has(self.requests) || self.requests.all(k, !(k.contains('/') || k.startsWith('hugepages-'))"
         " || (has(self.limits) && k in self.limits"
         " && quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) == 0))",
         "an extended resource (a GPU, hugepages) needs a limit equal to its request"),
    ))

    limits: ResourceList = Field(default_factory=dict)
    """Most of each resource the worker may use, e.g. {memory: 64Gi}. GPUs come from spec.job.gpus."""
    requests: ResourceList = Field(default_factory=dict)
    """What the scheduler reserves for the worker, e.g. {cpu: '4', memory: 32Gi}; at most the limit."""

    @model_validator(mode="after")
    def _consistent(self) -> Resources:
        for section in (self.limits, self.requests):
            for name in section:
                if "/" not in name and name not in STANDARD_RESOURCES and not name.startswith("hugepages-"):
                    raise ValueError(
                        f"{name!r}: resource names without a domain prefix must be cpu, memory, "
                        "ephemeral-storage or hugepages-<size>"
                    )
        for name, request in self.requests.items():
            limit = self.limits.get(name)
            extended = "/" in name or name.startswith("hugepages-")
            if extended and (limit is None or quantity_value(limit) != quantity_value(request)):
                raise ValueError(f"requests.{name}: an extended resource needs a limit equal to its request")
            if limit is not None and quantity_value(request) > quantity_value(limit):
                raise ValueError(f"requests.{name}: {request} is more than the limit {limit}")
        return self


# -- tolerations ------------------------------------------------------------------------------------


class Toleration(_Model):
    """A node taint the worker pod tolerates (Kubernetes Toleration)."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            ("!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
             "value must be empty when operator is Exists"),
            ("(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
             "an empty key needs operator Exists"),
            ("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
             "tolerationSeconds needs effect NoExecute"),
        )
    )

    key: Annotated[str, StringConstraints(max_length=317, pattern=rf"^$|{QUALIFIED_NAME}")] = ""
    """Taint key to tolerate; empty with operator Exists tolerates every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Equal: the taint's value must equal `value`; Exists: any value."""
    value: LabelValue = ""
    """Taint value for operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute", ""] = ""
    """Taint effect to tolerate; empty tolerates all effects."""
    toleration_seconds: int | None = None
    """How long the pod stays bound after a NoExecute taint appears; unset: forever."""

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("value must be empty when operator is Exists")
        if not self.key and self.operator != "Exists":
            raise ValueError("an empty key needs operator Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect NoExecute")
        return self


# -- affinity (the Kubernetes Affinity type, modelled so its structure is checked) --------------------

NodeOperator = Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
LabelOperator = Literal["In", "NotIn", "Exists", "DoesNotExist"]


def _check_values(operator: str, values: list[str]) -> None:
    if operator in ("In", "NotIn") and not values:
        raise ValueError(f"operator {operator} needs at least one value")
    if operator in ("Exists", "DoesNotExist") and values:
        raise ValueError(f"operator {operator} takes no values")
    if operator in ("Gt", "Lt") and (len(values) != 1 or not re.fullmatch(r"-?[0-9]+", values[0])):
        raise ValueError(f"operator {operator} needs exactly one integer value")


_VALUES_RULE = (
    "(self.operator in ['In', 'NotIn']) ? (has(self.values) && size(self.values) > 0)"
    " : (self.operator in ['Exists', 'DoesNotExist']) ? (!has(self.values) || size(self.values) == 0)"
    " : (has(self.values) && size(self.values) == 1)",
    "In and NotIn need values, Exists and DoesNotExist take none, Gt and Lt take exactly one",
)


class NodeSelectorRequirement(_Model):
    """A rule on a node label."""

    model_config = ConfigDict(json_schema_extra=_cel(_VALUES_RULE))

    key: QualifiedName
    """The node label key."""
    operator: NodeOperator
    """How the label's value is compared with `values`."""
    values: list[LabelValue] = Field(default_factory=list, max_length=MAX_ITEMS)
    """Values for In/NotIn (one or more) and Gt/Lt (one integer); none for Exists/DoesNotExist."""

    @model_validator(mode="after")
    def _values(self) -> NodeSelectorRequirement:
        _check_values(self.operator, self.values)
        return self


class NodeSelectorTerm(_Model):
    """Node rules that must all hold."""

    match_expressions: list[NodeSelectorRequirement] = Field(default_factory=list, max_length=MAX_ITEMS)
    """Rules on node labels."""
    match_fields: list[NodeSelectorRequirement] = Field(default_factory=list, max_length=MAX_ITEMS)
    """Rules on node fields (metadata.name)."""


class NodeSelector(_Model):
    """Node terms of which at least one must hold."""

    node_selector_terms: list[NodeSelectorTerm] = Field(min_length=1, max_length=MAX_ITEMS)
    """The terms, ORed."""


class PreferredSchedulingTerm(_Model):
    """A node term the scheduler prefers, with its weight."""

    weight: int = Field(ge=1, le=100)
    """Weight of this preference, 1 to 100."""
    preference: NodeSelectorTerm
    """The node rules preferred."""


class NodeAffinity(_Model):
    """Which nodes the worker pod may or prefers to run on."""

    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    """Nodes the pod may run on."""
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] = Field(
        default_factory=list, max_length=MAX_ITEMS
    )
    """Nodes the pod prefers."""


class LabelSelectorRequirement(_Model):
    """A rule on a pod (or namespace) label."""

    model_config = ConfigDict(json_schema_extra=_cel((
        "(self.operator in ['In', 'NotIn']) ? (has(self.values) && size(self.values) > 0)"
        " : (!has(self.values) || size(self.values) == 0)",
        "In and NotIn need values, Exists and DoesNotExist take none",
    )))

    key: QualifiedName
    """The label key."""
    operator: LabelOperator
    """How the label's value is compared with `values`."""
    values: list[LabelValue] = Field(default_factory=list, max_length=MAX_ITEMS)
    """Values for In/NotIn; none for Exists/DoesNotExist."""

    @model_validator(mode="after")
    def _values(self) -> LabelSelectorRequirement:
        _check_values(self.operator, self.values)
        return self


class LabelSelector(_Model):
    """Selects pods (or namespaces) by label."""

    match_labels: dict[QualifiedName, LabelValue] = Field(default_factory=dict, max_length=MAX_ITEMS)
    """Labels that must equal these values."""
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=MAX_ITEMS)
    """Rules on labels, ANDed."""


class PodAffinityTerm(_Model):
    """Pods the worker must (not) run near, within a topology domain."""

    label_selector: LabelSelector | None = None
    """The pods this term is about."""
    namespaces: list[Annotated[str, StringConstraints(max_length=63, pattern=rf"^{DNS_LABEL}$")]] = Field(
        default_factory=list, max_length=MAX_ITEMS
    )
    """Namespaces of those pods; empty: the merge's namespace."""
    namespace_selector: LabelSelector | None = None
    """Namespaces of those pods, by label."""
    topology_key: QualifiedName
    """Node label whose value defines "near" (e.g. kubernetes.io/hostname)."""


class WeightedPodAffinityTerm(_Model):
    """A preferred pod affinity term with its weight."""

    weight: int = Field(ge=1, le=100)
    """Weight of this preference, 1 to 100."""
    pod_affinity_term: PodAffinityTerm
    """The term preferred."""


class PodAffinity(_Model):
    """Pod (anti-)affinity rules."""

    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] = Field(
        default_factory=list, max_length=MAX_ITEMS
    )
    """Terms that must hold."""
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] = Field(
        default_factory=list, max_length=MAX_ITEMS
    )
    """Terms preferred."""


class Affinity(_Model):
    """Scheduling constraints of the worker pod (Kubernetes Affinity)."""

    node_affinity: NodeAffinity | None = None
    """Node affinity."""
    pod_affinity: PodAffinity | None = None
    """Pods to run near."""
    pod_anti_affinity: PodAffinity | None = None
    """Pods to stay away from."""


# -- spec.job ---------------------------------------------------------------------------------------


class Job(_Model):
    """Kubernetes-only settings of the merge Job; the local CLI ignores them. A cluster's admission
    policy (see docs/install.md) may restrict gpus, resources, tolerations, nodeSelector, affinity
    and priorityClassName."""

    gpus: int = Field(default=1, ge=0, le=64)
    """GPUs for the worker (a limit on the operator's GPU resource, nvidia.com/gpu by default)."""
    resources: Resources = Field(default_factory=Resources)
    """CPU, memory and other requests and limits of the worker container."""
    node_selector: dict[QualifiedName, LabelValue] = Field(default_factory=dict, max_length=MAX_ITEMS)
    """Node labels the worker's node must have; added to the operator's defaults, key by key."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=MAX_ITEMS)
    """Taints the worker pod tolerates, after the operator's defaults."""
    affinity: Affinity = Field(default_factory=Affinity)
    """Node and pod affinity of the worker pod."""
    priority_class_name: Annotated[str, StringConstraints(max_length=253, pattern=rf"^$|^{DNS_SUBDOMAIN}$")] = ""
    """PriorityClass of the worker pod; empty: the cluster's default."""
    queue_name: Annotated[str, StringConstraints(max_length=63, pattern=rf"^$|^{DNS_SUBDOMAIN}$")] = ""
    """Kueue LocalQueue for the Job; empty: the operator's default queue, if any."""
    backoff_limit: int = Field(default=2, ge=0)
    """Retries after a failed worker pod (invalid input and low retention are never retried)."""
    active_deadline_seconds: int = Field(default=7200, ge=1)
    """The Job fails when it runs longer than this."""
    ttl_seconds_after_finished: int = Field(default=86400, ge=0)
    """The finished Job is deleted after this; the resource's status keeps the verdict."""

    def affinity_dict(self) -> dict[str, Any]:
        """The affinity as the pod spec wants it (camelCase, unset fields left out)."""
        return self.affinity.model_dump(by_alias=True, exclude_unset=True)

    def resources_dict(self) -> dict[str, Any]:
        return self.resources.model_dump(by_alias=True, exclude_unset=True)

    def tolerations_list(self) -> list[dict[str, Any]]:
        return [t.model_dump(by_alias=True, exclude_unset=True) for t in self.tolerations]
