"""Least-privilege RBAC: the chart grants the operator exactly API use of docs/interfaces.md #10, and nothing else.

Rendered rules are compared with the contract; then, against the real control plane, the operator's
identity from support.chart_identity is asked (SelfSubjectAccessReview, what `kubectl auth can-i`
sends) whether it may do each contract action, and whether it may read Secrets (it may not), even the
one spec.storage.credentialsSecret names while it creates the Job that uses it (docs/storage.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import yaml
from support.chart_identity import operator_kubeconfig, worker_service_account
from support.control_plane import wait_until

from merge_worker.spec import parse_spec

from adaptermerge_operator import job_manifest
from adaptermerge_operator.settings import Settings

# docs/interfaces.md #10, as (API group, resource, subresource) -> verbs. Namespaced resources first.
# kopf: list/watch and patch of the resource and its status, core/v1 event posts, peering; the
# operator: merges get and status update, Jobs and ConfigMaps create/get/delete, the Job and pod indexes,
# Job patch (its finalizer), event list (FailedCreate) and pods/log get (a running search's progress).
NAMESPACED = {
    ("adaptermerge.io", "adaptermerges", ""): {"get", "list", "watch", "patch"},
    ("adaptermerge.io", "adaptermerges", "status"): {"patch", "update"},
    ("adaptermerge.io", "adaptermerges", "finalizers"): {"update"},
    ("batch", "jobs", ""): {"get", "list", "watch", "create", "delete", "patch"},
    ("", "pods", ""): {"list", "watch"},
    ("", "pods", "log"): {"get"},
    ("", "configmaps", ""): {"get", "create", "delete"},
    ("", "events", ""): {"create", "list"},
    ("kopf.dev", "kopfpeerings", ""): {"get", "list", "watch", "patch"},
}
# Cluster-wide mode only: kopf scans namespaces and CRDs (fixed namespaces turn scanning off).
CLUSTER_WIDE_ONLY = {
    ("kopf.dev", "clusterkopfpeerings", ""): {"get", "list", "watch", "patch"},
    ("", "namespaces", ""): {"list", "watch"},
    ("apiextensions.k8s.io", "customresourcedefinitions", ""): {"list", "watch"},
}
# The operator never touches a Secret: the Job's env names one (secretKeyRef) and the kubelet reads it.
SECRETS = [(verb, "", "secrets", "") for verb in ("get", "list", "watch", "create", "update", "patch", "delete")]
# Things the operator never does; each must be denied.
FORBIDDEN = SECRETS + [
    ("create", "", "pods", ""),
    ("delete", "", "pods", ""),
    ("delete", "adaptermerge.io", "adaptermerges", ""),
    ("create", "adaptermerge.io", "adaptermerges", ""),
    ("update", "batch", "jobs", ""),
    ("get", "", "pods", ""),
    ("create", "", "pods", "exec"),
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


def operator_cluster_roles(objects: list[dict]) -> list[dict]:
    """ClusterRoles bound to the operator (the user roles below are bound by people, to people)."""
    bound = {b["roleRef"]["name"] for b in rbac(objects, "ClusterRoleBinding")}
    return [r for r in rbac(objects, "ClusterRole") if r["metadata"]["name"] in bound or
            not r["metadata"]["name"].endswith(("-edit", "-view"))]


def test_cluster_wide_rules_are_exactly_the_contract(render):
    objects = render()
    assert rbac(objects, "Role") == [] and rbac(objects, "RoleBinding") == []
    (cluster_role,) = operator_cluster_roles(objects)
    assert granted(cluster_role["rules"]) == expand({**NAMESPACED, **CLUSTER_WIDE_ONLY})
    (binding,) = rbac(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]


def test_namespaced_rules_are_roles_in_watched_namespaces_only(render):
    objects = render({"watchNamespaces": ["team-a", "team-b"]}, namespace="ops")
    roles = rbac(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert granted(role["rules"]) == expand(NAMESPACED)
    assert operator_cluster_roles(objects) == [] and rbac(objects, "ClusterRoleBinding") == []
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
    no_secrets_anywhere = SECRETS
    assert wrongly_answered(control_plane, kubeconfig, no_secrets_anywhere, None, allowed=False) == []
    # The plain kubectl answer a person would ask for, too.
    answer = control_plane.kubectl("auth", "can-i", "get", "secrets", "-n", namespace, kubeconfig=kubeconfig, check=False)
    assert answer.stdout.strip() == "no"


@pytest.mark.cluster
def test_the_operator_creates_the_job_that_uses_a_credentials_secret_it_cannot_read(control_plane, chart_crds, namespace):
    """spec.storage.credentialsSecret needs no Secret RBAC: the operator's identity creates the Job whose
    env takes the keys from the Secret (secretKeyRef), and may still not read that Secret by name."""
    kubeconfig = operator_kubeconfig(control_plane, namespace)
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
              "stringData": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "key"}}
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(secret))
    merge = {"apiVersion": "adaptermerge.io/v1alpha1", "kind": "AdapterMerge",
             "metadata": {"name": "from-a-bucket", "namespace": namespace},
             "spec": {"storage": {"endpoint": "http://s3.example:9000", "credentialsSecret": "s3-credentials"},
                      "adapters": [{"name": "a", "uri": "s3://adapters/a"}, {"name": "b", "uri": "s3://adapters/b"}],
                      "method": "linear", "output": {"uri": "s3://merged/dev"}}}
    created = control_plane.kubectl("create", "-n", namespace, "-o", "json", "-f", "-", input=json.dumps(merge))
    merge = json.loads(created.stdout)
    job = job_manifest.render_job(merge, parse_spec(merge["spec"]), Settings())
    [worker] = job["spec"]["template"]["spec"]["containers"]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in worker["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs == {"s3-credentials"}, worker["env"]

    done = control_plane.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(job),
                                 kubeconfig=kubeconfig, check=False)
    assert done.returncode == 0, done.stderr
    for verb in ("get", "watch", "update", "delete"):
        answer = control_plane.kubectl("auth", "can-i", verb, "secret/s3-credentials", "-n", namespace,
                                       kubeconfig=kubeconfig, check=False)
        assert answer.stdout.strip() == "no", (verb, answer.stdout, answer.stderr)


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
    (cluster_role,) = operator_cluster_roles(render(labelled))
    claims = {("", "persistentvolumeclaims", "get")}
    assert granted(cluster_role["rules"]) == expand({**NAMESPACED, **CLUSTER_WIDE_ONLY}) | claims
    for role in rbac(render({**labelled, "watchNamespaces": ["team-a"]}), "Role"):
        assert granted(role["rules"]) == expand(NAMESPACED) | claims


# ---- people: the aggregated user roles ----------------------------------------------------------------

USER_EDIT = {("adaptermerge.io", "adaptermerges", ""): {"get", "list", "watch", "create", "update", "patch",
                                                        "delete", "deletecollection"},
             ("adaptermerge.io", "adaptermerges", "status"): {"get", "list", "watch"}}
USER_VIEW = {("adaptermerge.io", "adaptermerges", ""): {"get", "list", "watch"},
             ("adaptermerge.io", "adaptermerges", "status"): {"get", "list", "watch"}}


def user_roles(objects: list[dict]) -> dict[str, dict]:
    return {r["metadata"]["name"].rsplit("-", 1)[1]: r for r in rbac(objects, "ClusterRole")
            if r["metadata"]["name"].endswith(("-edit", "-view"))}


def test_user_roles_aggregate_into_edit_and_view_and_never_write_status(render):
    roles = user_roles(render())
    assert granted(roles["edit"]["rules"]) == expand(USER_EDIT)
    assert granted(roles["view"]["rules"]) == expand(USER_VIEW)
    edit_labels, view_labels = roles["edit"]["metadata"]["labels"], roles["view"]["metadata"]["labels"]
    assert edit_labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit_labels["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view_labels["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-edit" not in view_labels
    assert user_roles(render({"userRoles": {"create": False}})) == {}


@pytest.mark.cluster
def test_namespace_editors_and_viewers_get_adaptermerges_through_the_builtin_roles(control_plane, helm, namespace):
    from support.chart_identity import helm_template, object_prefix

    manifest = helm_template(helm, namespace, {"fullnameOverride": object_prefix(namespace)},
                             show_only=("templates/user-roles.yaml",))
    control_plane.kubectl("apply", "-f", "-", input=manifest)
    people = {}
    for person, builtin in (("editor", "edit"), ("viewer", "view")):
        control_plane.kubectl("create", "serviceaccount", person, "-n", namespace)
        control_plane.kubectl("create", "rolebinding", person, f"--clusterrole={builtin}",
                              f"--serviceaccount={namespace}:{person}", "-n", namespace)
        token = control_plane.kubectl("create", "token", person, "-n", namespace).stdout.strip()
        people[person] = control_plane.kubeconfig_for_token(token)
    edit_checks, view_checks = checks_of(USER_EDIT), checks_of(USER_VIEW)
    writes = [c for c in edit_checks if c not in view_checks]
    status_writes = [(v, "adaptermerge.io", "adaptermerges", "status") for v in ("update", "patch")]
    # The aggregation controller fills the built-in roles a moment after the ClusterRoles appear.
    wait_until(lambda: wrongly_answered(control_plane, people["editor"], edit_checks, namespace, allowed=True) == [],
               30, "edit to include AdapterMerges")
    wait_until(lambda: wrongly_answered(control_plane, people["viewer"], view_checks, namespace, allowed=True) == [],
               30, "view to include AdapterMerges")
    assert wrongly_answered(control_plane, people["viewer"], writes, namespace, allowed=False) == []
    assert wrongly_answered(control_plane, people["editor"], status_writes, namespace, allowed=False) == []
    assert wrongly_answered(control_plane, people["editor"], edit_checks, "any-other-namespace", allowed=False) == []
