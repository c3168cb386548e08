"""Credentials for a registry behind htpasswd auth (the real distribution registry): read from a Docker
config file (REGISTRY_AUTH_FILE, DOCKER_CONFIG, ~/.docker/config.json), refused ones exit 2 naming the
field, and the password appears nowhere: not in the log, the result file or the pushed manifest."""

from __future__ import annotations

import base64
import json

import pytest

from support.storage_cli import cli, files_of, pulled, spec_of


def _secrets(registry) -> list[str]:
    return [registry.password, base64.b64encode(f"{registry.username}:{registry.password}".encode()).decode()]


@pytest.fixture
def pushed(oci_registry_auth, tiny_store):
    reg = oci_registry_auth
    reg.push_artifact("adapters/a", "v1", files_of(tiny_store / "adapters" / "a"))
    reg.push_artifact("adapters/b", "v1", files_of(tiny_store / "adapters" / "b"))
    return reg


def test_auth_file_credentials_pull_and_push(pushed, tmp_path):
    reg = pushed
    auth_file = reg.docker_config(tmp_path / "auth.json")
    out = f"oci://{reg.host}/merged/auth:v1"
    code, log, result = cli(tmp_path, spec_of(f"oci://{reg.host}/adapters/a:v1", f"oci://{reg.host}/adapters/b:v1",
                                             {"uri": out}), {"REGISTRY_AUTH_FILE": str(auth_file)})
    assert code == 0, log
    _, digest, files = pulled(reg, "merged/auth", "v1")
    assert result["output"]["digest"] == digest
    for text in (log, json.dumps(result), files["merge-manifest.json"].decode()):
        for secret in _secrets(reg):
            assert secret not in text


@pytest.mark.parametrize("where", ["DOCKER_CONFIG", "HOME"])
def test_docker_config_folder_and_home(pushed, tmp_path, where):
    reg = pushed
    folder = tmp_path / ("docker-config" if where == "DOCKER_CONFIG" else ".docker")
    folder.mkdir()
    reg.docker_config(folder / "config.json")
    env = {"DOCKER_CONFIG": str(folder)} if where == "DOCKER_CONFIG" else {}  # cli() sets HOME to tmp_path
    code, log, _ = cli(tmp_path, spec_of(f"oci://{reg.host}/adapters/a:v1", f"oci://{reg.host}/adapters/b:v1",
                                        {"uri": f"oci://{reg.host}/merged/home:{where.lower()}"}), env,
                        command="validate")
    assert code == 0, log


@pytest.mark.parametrize(("case", "field", "words"), [
    ("wrong-password", "spec.adapters[0].uri", "access denied"),
    ("no-credentials", "spec.adapters[0].uri", "asks for credentials"),
    ("other-registry-only", "spec.adapters[0].uri", "asks for credentials"),
    ("missing-file", "spec.registry", "does not exist"),
    ("not-json", "spec.registry", "not readable JSON"),
])
def test_refused_credentials_exit_2(pushed, tmp_path, case, field, words):
    reg = pushed
    auth_file = tmp_path / "auth.json"
    if case == "wrong-password":
        reg.docker_config(auth_file, password="not-" + reg.password)
    elif case == "other-registry-only":
        auth_file.write_text(json.dumps({"auths": {"elsewhere.example:5000": {"auth": "dTpw"}}}))
    elif case == "not-json":
        auth_file.write_text("{" + reg.password)
    env = {} if case == "no-credentials" else {"REGISTRY_AUTH_FILE": str(auth_file)}
    code, log, result = cli(tmp_path, spec_of(f"oci://{reg.host}/adapters/a:v1", f"oci://{reg.host}/adapters/b:v1",
                                             {"uri": f"oci://{reg.host}/merged/refused:{case}"}), env)
    assert code == 2, log
    assert result["field"] == field and words in result["message"], result
    for secret in _secrets(reg):
        assert secret not in log + json.dumps(result)
