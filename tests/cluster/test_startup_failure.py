"""A control plane that cannot start says why and leaves no process behind (no real binaries needed)."""

from __future__ import annotations

import os

import pytest

from support.control_plane import StartupError, running_control_plane


def fake_binary(path, script: str) -> None:
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


def test_a_crashing_component_fails_start_up_with_its_log_and_stops_the_others(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pid_file = tmp_path / "apiserver.pid"
    # etcd crashes only once the API server runs (a fixed sleep raced the start-up on a loaded machine).
    fake_binary(bin_dir / "etcd", f"while [ ! -s {pid_file} ]; do sleep 0.05; done; "
                "echo 'etcd: cannot listen (fake failure)'; exit 1")
    fake_binary(bin_dir / "kube-apiserver", f"echo $$ > {pid_file}; exec sleep 120")

    with pytest.raises(StartupError) as failure:
        with running_control_plane(tmp_path / "work", bin_dir=bin_dir):
            pass

    message = str(failure.value)
    assert "etcd exited" in message  # noticed as a crash, not after the start-up timeout
    assert "etcd: cannot listen (fake failure)" in message
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
