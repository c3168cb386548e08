"""How the operator copes with a burst among many objects that are not its own: N AdapterMerges
applied at once on the real test control plane, which already holds U unrelated pods and U unrelated Jobs.

    python bench/operator_scale.py [--count 300] [--unrelated 5000] [--settle 15]

Starts etcd, kube-apiserver and kube-controller-manager (tests/support/control_plane.py), installs
the CRD, creates the unrelated pods and (suspended) Jobs in another namespace as API objects (no
scheduler or kubelet runs: they are what the operator's watches would see), runs `adaptermerge
operator --all-namespaces` with the Helm chart's cluster-wide operator identity, applies N resources
in one `kubectl create`, and prints: seconds until every resource has its Job, seconds until every
status names its Job, duplicate Jobs (after a settle period), the operator's RSS before and at peak,
and its own /metrics (Jobs created, mean handler latency). Targets: every Job within 60 s, no
duplicates, peak RSS under 250 MiB.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.chart_identity import operator_kubeconfig, worker_service_account  # noqa: E402
from support.control_plane import running_control_plane, wait_until  # noqa: E402
from support.operator_process import OperatorProcess  # noqa: E402

NAMESPACE = "bench"
NOISE = "unrelated"
CHUNK = 500  # objects per `kubectl create`
TARGET_SECONDS, TARGET_RSS_MIB = 60, 250


def resources(count: int) -> str:
    spec = {
        "volume": {"claimName": "store"},
        "adapters": [{"name": "a", "path": "adapters/a"}, {"name": "b", "path": "adapters/b"}],
        "method": "ties",
        "parameters": {"density": 0.5},
        "job": {"gpus": 1},
    }
    return yaml.safe_dump_all(
        {"apiVersion": "adaptermerge.io/v1alpha1", "kind": "AdapterMerge", "metadata": {"name": f"merge-{i:04d}"},
         "spec": {**spec, "output": {"path": f"merged/{i:04d}"}}}
        for i in range(count)
    )


def unrelated(kind: str, start: int, count: int) -> str:
    """Pods and suspended Jobs of some other application (suspended: no pods of their own)."""
    pod_spec = {"containers": [{"name": "app", "image": "example.invalid/app:1",
                                "env": [{"name": "PADDING", "value": "x" * 512}]}]}
    objects = []
    for i in range(start, start + count):
        meta = {"name": f"other-{i:05d}", "labels": {"app": "other", "shard": str(i % 16)}}
        if kind == "pod":
            objects.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec})
        else:
            objects.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": {
                "suspend": True, "template": {"spec": {"restartPolicy": "Never", **pod_spec}}}})
    return yaml.safe_dump_all(objects)


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/<pid>/status")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/<pid>/status")


def list_items(plane, kind: str) -> list[dict]:
    return plane.get_json(kind, namespace=NAMESPACE)["items"]


def job_owners(plane) -> collections.Counter:
    return collections.Counter(j["metadata"]["labels"].get("adaptermerge.io/uid") for j in list_items(plane, "jobs"))


def with_status(plane) -> int:
    return sum(1 for m in list_items(plane, "adaptermerges") if (m.get("status") or {}).get("jobName"))


def wait_for(count: int, measure, start: float, timeout: float) -> float | None:
    while time.monotonic() - start < timeout:
        if measure() >= count:
            return time.monotonic() - start
        time.sleep(0.5)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--unrelated", type=int, default=5000, help="pods, and as many Jobs, not the operator's")
    parser.add_argument("--settle", type=float, default=15, help="seconds to keep watching for duplicates")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="operator-scale-") as work, running_control_plane(Path(work) / "cp") as plane:
        plane.kubectl("apply", "-f", str(REPO / "crds" / "adaptermerge.io_adaptermerges.yaml"))
        # `kubectl wait` fails instead of waiting while the new CRD has no status yet: retry it.
        wait_until(lambda: plane.kubectl("wait", "--for=condition=Established", "crd/adaptermerges.adaptermerge.io",
                                         check=False).returncode == 0, 60, "the CRD")
        plane.kubectl("create", "namespace", NAMESPACE)
        plane.kubectl("create", "namespace", NOISE)
        noise_start = time.monotonic()
        for kind in ("pod", "job"):
            for start in range(0, args.unrelated, CHUNK):
                plane.kubectl("create", "-n", NOISE, "-f", "-", input=unrelated(kind, start, min(CHUNK, args.unrelated - start)))
        noise_seconds = time.monotonic() - noise_start
        kubeconfig = operator_kubeconfig(plane, NAMESPACE, {"workerServiceAccount": {"namespaces": [NAMESPACE]}})
        env = {"ADAPTERMERGE_WORKER_SERVICE_ACCOUNT": worker_service_account(NAMESPACE)}
        log = Path(work) / "operator.log"
        running = OperatorProcess(kubeconfig, None, log, env, args=("--all-namespaces",))
        operator = running.process
        try:
            running.wait_serving()
            time.sleep(10)  # the operator's start-up (initial lists of every watched resource), not the burst
            idle_rss = rss_mib(operator.pid)
            startup_log_lines = len(log.read_text().splitlines())
            start = time.monotonic()
            plane.kubectl("create", "-n", NAMESPACE, "-f", "-", input=resources(args.count))
            applied = time.monotonic() - start
            jobs_done = wait_for(args.count, lambda: len(job_owners(plane)), start, args.timeout)
            status_done = wait_for(args.count, lambda: with_status(plane), start, args.timeout)
            time.sleep(args.settle)
            owners = job_owners(plane)
            duplicates = sum(n - 1 for n in owners.values())
            rss = peak_rss_mib(operator.pid)
            final_rss = rss_mib(operator.pid)
            metrics = running.metrics()
            burst_log = log.read_text().splitlines()[startup_log_lines:]
            errors = [line for line in burst_log if "ERROR" in line or "Traceback" in line]
            for line in errors[:5]:
                print(f"operator: {line[:400]}", file=sys.stderr)
        finally:
            running.stop()

    def seconds(value: float | None) -> str:
        return "timeout" if value is None else f"{value:.1f}"

    def total(name: str) -> float:
        return sum(v for (sample, _), v in metrics.items() if sample == name)

    latency = total("adaptermerge_reconcile_seconds_sum") / max(1.0, total("adaptermerge_reconcile_seconds_count"))
    rows = [
        (f"unrelated pods + Jobs created first ({NOISE} namespace)", f"{2 * args.unrelated}", f"in {noise_seconds:.0f} s"),
        ("resources applied (kubectl create)", f"{applied:.1f} s", ""),
        (f"every one of {args.count} Jobs exists", f"{seconds(jobs_done)} s", f"<= {TARGET_SECONDS} s"),
        ("  of that, after the last create", f"{seconds(None if jobs_done is None else jobs_done - applied)} s", ""),
        ("every status names its Job", f"{seconds(status_done)} s", ""),
        (f"duplicate Jobs (after {args.settle:.0f} s more)", str(duplicates), "0"),
        ("Jobs in total", str(sum(owners.values())), str(args.count)),
        ("operator RSS before the burst", f"{idle_rss:.0f} MiB", ""),
        ("operator peak RSS", f"{rss:.0f} MiB", f"< {TARGET_RSS_MIB} MiB"),
        ("operator RSS at the end", f"{final_rss:.0f} MiB", ""),
        ("Jobs created (its /metrics)", f"{total('adaptermerge_jobs_created_total'):.0f}", str(args.count)),
        ("mean handler latency (its /metrics)", f"{1000 * latency:.0f} ms", ""),
        ("ERROR lines in the operator log during the burst", str(len(errors)), "0"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>10}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>10}  {target}")
    met = jobs_done is not None and jobs_done <= TARGET_SECONDS and duplicates == 0 and rss < TARGET_RSS_MIB
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
