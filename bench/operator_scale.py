"""How the operator copes with a burst: N AdapterMerges applied at once on the real test control plane.

    python bench/operator_scale.py [--count 300] [--settle 15]

Starts etcd, kube-apiserver and kube-controller-manager (tests/support/control_plane.py), installs
the CRD, runs `adaptermerge operator` as a subprocess with the Helm chart's operator identity, applies
N resources in one `kubectl create`, and prints: seconds until every resource has its Job, seconds
until every status names its Job, duplicate Jobs (after a settle period), and the operator's peak RSS.
No kubelet runs: pods stay Pending, which is all the Jobs' creation needs. Targets: every Job within
60 s, no duplicates, peak RSS under 250 MiB.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.chart_identity import operator_kubeconfig, worker_service_account  # noqa: E402
from support.control_plane import running_control_plane  # noqa: E402

NAMESPACE = "bench"
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
    parser.add_argument("--settle", type=float, default=15, help="seconds to keep watching for duplicates")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="operator-scale-") as work, running_control_plane(Path(work) / "cp") as plane:
        plane.kubectl("apply", "-f", str(REPO / "crds" / "adaptermerge.io_adaptermerges.yaml"))
        plane.kubectl("wait", "--for=condition=Established", "crd/adaptermerges.adaptermerge.io")
        plane.kubectl("create", "namespace", NAMESPACE)
        kubeconfig = operator_kubeconfig(plane, NAMESPACE, {"watchNamespaces": [NAMESPACE]})
        env = {**os.environ, "KUBECONFIG": str(kubeconfig),
               "ADAPTERMERGE_WORKER_SERVICE_ACCOUNT": worker_service_account(NAMESPACE)}
        log = Path(work) / "operator.log"
        with log.open("w") as out:
            operator = subprocess.Popen(
                [str(Path(sys.executable).parent / "adaptermerge"), "operator", "--standalone", "-n", NAMESPACE],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )
        try:
            time.sleep(5)  # the operator's start-up, not part of the burst
            idle_rss = peak_rss_mib(operator.pid)
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
            burst_log = log.read_text().splitlines()[startup_log_lines:]
            errors = [line for line in burst_log if "ERROR" in line or "Traceback" in line]
            for line in errors[:5]:
                print(f"operator: {line[:400]}", file=sys.stderr)
        finally:
            operator.terminate()
            operator.wait(30)

    def seconds(value: float | None) -> str:
        return "timeout" if value is None else f"{value:.1f}"

    rows = [
        ("resources applied (kubectl create)", f"{applied:.1f} s", ""),
        (f"every one of {args.count} Jobs exists", f"{seconds(jobs_done)} s", f"<= {TARGET_SECONDS} s"),
        ("  of that, after the last create", f"{seconds(None if jobs_done is None else jobs_done - applied)} s", ""),
        ("every status names its Job", f"{seconds(status_done)} s", ""),
        (f"duplicate Jobs (after {args.settle:.0f} s more)", str(duplicates), "0"),
        ("Jobs in total", str(sum(owners.values())), str(args.count)),
        ("operator RSS before the burst", f"{idle_rss:.0f} MiB", ""),
        ("operator peak RSS", f"{rss:.0f} MiB", f"< {TARGET_RSS_MIB} MiB"),
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
