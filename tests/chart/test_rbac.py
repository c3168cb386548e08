"""Least-privilege RBAC: the chart grants the operator exactly API use of docs/interfaces.md #10, and nothing else.

Rendered rules are compared with the contract; then, against the real control plane, the operator's
identity from support.chart_identity is asked (SelfSubjectAccessReview, what `kubectl auth can-i`
sends) whether it may do each contract action, and whether it may read Secrets (it may not).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.chart_identity import operator_kubeconfig, worker_service_account

# docs/interfaces.md #10, as (API group, resource, subresource) -> verbs. Namespaced resources first.
# kopf: list/watch and patch of the resource and its status, core/v1 event posts, peering; the
# operator: merges get and status update, Jobs and ConfigMaps create/get/delete, the Job and pod indexes.
NAMESPACED = {
    ("adaptermerge.io", "adaptermerges", ""): {"get", "list", "watch", "patch"},
    ("adaptermerge.io", "adaptermerges", "status"): {"patch", "update"},
    ("adaptermerge.io", "adaptermerges", "finalizers"): {"update"},
    ("batch", "jobs", ""): {"get", "list", "watch", "create", "delete"},
    ("", "pods", ""): {"list", "watch"},
    ("", "configmaps", ""): {"get", "create", "delete"},
    ("", "events", ""): {"create"},
    ("kopf.dev", "kopfpeerings", ""): {"get", "list", "watch", "patch"},
}
# Cluster-wide mode only: kopf scans namespaces and CRDs (fixed namespaces turn scanning off).
CLUSTER_WIDE_ONLY = {
    ("kopf.dev", "clusterkopfpeerings", ""): {"get", "list", "watch", "patch"},
    ("", "namespaces", ""): {"list", "watch"},
    ("apiextensions.k8s.io", "customresourcedefinitions", ""): {"list", "watch"},
}
# Things the operator never does; each must be denied.
FORBIDDEN = [
    ("get", "", "secrets", ""),
    ("list", "", "secrets", ""),
    ("watch", "", "secrets", ""),
    ("create", "", "pods", ""),
    ("delete", "", "pods", ""),
    ("delete", "adaptermerge.io", "adaptermerges", ""),
    ("create", "adaptermerge.io", "adaptermerges", ""),
    ("update", "batch", "jobs", ""),
    ("patch", "batch", "jobs", ""),
    ("get", "", "pods", ""),
    ("list", "", "configmaps", ""),
    ("update", "adaptermerge.io", "adaptermerges", ""),
    ("create", "", "serviceaccounts", ""),
    ("create", "", "serviceaccounts", "token"),
    ("create", "rbac.authorization.k8s.io", "rolebindings", ""),
    ("create", "kopf.dev", "kopfpeerings", ""),
    ("create", "apiextensions.k8s.io", "customresourcedefinitions", ""),
]


def expand(table: dict) -> set[tuple[str, str, str]]:
    """-> {(group, "resource[/subresource]", verb)}"""
    return {(g, f"{r}/{s}" if s else r, v) for (g, r, s), verbs in table.items() for v in verbs}


def granted(rules: list[dict]) -> set[tuple[str, str, str]]:
    out = set()
    for rule in rules:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for part in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[part], f"wildcard in {rule}"
        out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


def rbac(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def test_cluster_wide_rules_are_exactly_the_contract(render):
    objects = render()
    assert rbac(objects, "Role") == [] and rbac(objects, "RoleBinding") == []
    (cluster_role,) = rbac(objects, "ClusterRole")
    assert granted(cluster_role["rules"]) == expand({**NAMESPACED, **CLUSTER_WIDE_ONLY})
    (binding,) = rbac(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]


def test_namespaced_rules_are_roles_in_watched_namespaces_only(render):
    objects = render({"watchNamespaces": ["team-a", "team-b"]}, namespace="ops")
    roles = rbac(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert granted(role["rules"]) == expand(NAMESPACED)
    assert rbac(objects, "ClusterRole") == [] and rbac(objects, "ClusterRoleBinding") == []
    bindings = rbac(objects, "RoleBinding")
    assert len(bindings) == 2
    for binding in bindings:
        (subject,) = binding["subjects"]
        assert (subject["kind"], subject["namespace"]) == ("ServiceAccount", "ops")


def test_worker_service_account_is_bound_to_nothing(render):
    objects = render({"watchNamespaces": ["team-a"]})
    workers = {a["metadata"]["name"] for a in rbac(objects, "ServiceAccount") if a["metadata"]["name"].endswith("-worker")}
    assert workers
    subjects = {s["name"] for b in rbac(objects, "RoleBinding") + rbac(objects, "ClusterRoleBinding") for s in b["subjects"]}
    assert not workers & subjects


# ---- against the real control plane -------------------------------------------------------------


def access_reviews(control_plane, kubeconfig: Path, checks: list[tuple[str, str, str, str]], namespace: str | None):
    """[(verb, group, resource, subresource)] -> [allowed], asked as the kubeconfig's identity."""
    reviews = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectAccessReview",
                "spec": {"resourceAttributes": {"verb": verb, "group": group, "resource": resource,
                                                "subresource": subresource, "namespace": namespace or ""}},
            }
            for verb, group, resource, subresource in checks
        ],
    }
    done = control_plane.kubectl("create", "-f", "-", "-o", "json", input=json.dumps(reviews), kubeconfig=kubeconfig)
    answers, text, decoder = [], done.stdout.strip(), json.JSONDecoder()
    while text:  # kubectl prints one JSON document per review, back to back
        review, end = decoder.raw_decode(text)
        answers.append(review["status"]["allowed"])
        text = text[end:].lstrip()
    assert len(answers) == len(checks)
    return answers


def checks_of(table: dict) -> list[tuple[str, str, str, str]]:
    return [(v, g, r, s) for (g, r, s), verbs in table.items() for v in sorted(verbs)]


def wrongly_answered(control_plane, kubeconfig, checks, namespace, *, allowed: bool) -> list:
    """The checks whose answer is not `allowed`: [] when the identity may do exactly what is expected."""
    return [c for c, ok in zip(checks, access_reviews(control_plane, kubeconfig, checks, namespace)) if ok != allowed]


@pytest.mark.cluster
def test_cluster_wide_identity_can_do_the_contract_and_cannot_read_secrets(control_plane, namespace):
    kubeconfig = operator_kubeconfig(control_plane, namespace)
    assert wrongly_answered(control_plane, kubeconfig, checks_of(NAMESPACED), namespace, allowed=True) == []
    assert wrongly_answered(control_plane, kubeconfig, checks_of(NAMESPACED), "any-other-namespace", allowed=True) == []
    cluster = checks_of(CLUSTER_WIDE_ONLY)
    assert wrongly_answered(control_plane, kubeconfig, cluster, None, allowed=True) == []
    assert wrongly_answered(control_plane, kubeconfig, FORBIDDEN, namespace, allowed=False) == []
    no_secrets_anywhere = FORBIDDEN[:3]
    assert wrongly_answered(control_plane, kubeconfig, no_secrets_anywhere, None, allowed=False) == []
    # The plain kubectl answer a person would ask for, too.
    answer = control_plane.kubectl("auth", "can-i", "get", "secrets", "-n", namespace, kubeconfig=kubeconfig, check=False)
    assert answer.stdout.strip() == "no"


@pytest.mark.cluster
def test_namespaced_identity_is_limited_to_watched_namespaces(control_plane, namespace, extra_namespace):
    kubeconfig = operator_kubeconfig(control_plane, namespace, {"watchNamespaces": [extra_namespace]})
    assert wrongly_answered(control_plane, kubeconfig, checks_of(NAMESPACED), extra_namespace, allowed=True) == []
    # Its own release namespace is not watched: nothing there, and nothing cluster-wide.
    assert wrongly_answered(control_plane, kubeconfig, checks_of(NAMESPACED), namespace, allowed=False) == []
    assert wrongly_answered(control_plane, kubeconfig, checks_of(CLUSTER_WIDE_ONLY), None, allowed=False) == []
    assert wrongly_answered(control_plane, kubeconfig, FORBIDDEN, extra_namespace, allowed=False) == []


@pytest.mark.cluster
def test_worker_identity_can_do_nothing(control_plane, namespace):
    operator_kubeconfig(control_plane, namespace)  # applies the ServiceAccounts
    worker = worker_service_account(namespace)
    token = control_plane.kubectl("create", "token", worker, "-n", namespace).stdout.strip()
    kubeconfig = control_plane.kubeconfig_for_token(token)
    everything = checks_of({**NAMESPACED, **CLUSTER_WIDE_ONLY}) + FORBIDDEN
    assert wrongly_answered(control_plane, kubeconfig, everything, namespace, allowed=False) == []


def test_claim_labels_in_the_policy_add_reading_claims_and_nothing_else(render):
    labelled = {"policy": {"claims": {"matchLabels": {"adaptermerge.io/allowed": "true"}}}}
    (cluster_role,) = rbac(render(labelled), "ClusterRole")
    claims = {("", "persistentvolumeclaims", "get")}
    assert granted(cluster_role["rules"]) == expand({**NAMESPACED, **CLUSTER_WIDE_ONLY}) | claims
    for role in rbac(render({**labelled, "watchNamespaces": ["team-a"]}), "Role"):
        assert granted(role["rules"]) == expand(NAMESPACED) | claims
