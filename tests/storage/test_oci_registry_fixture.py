"""The registry the oci:// tests run against is a real one: it stores what is pushed, serves it by tag and
by digest, and its htpasswd auth refuses anonymous and wrong credentials."""

from __future__ import annotations

import requests

from support.oci_registry import digest_of


def test_pushed_artifact_is_served_by_tag_and_digest(oci_registry):
    digest = oci_registry.push_artifact("fixture/art", "v1", {"a.txt": b"hello", "b.bin": b"\x00\x01"})
    manifest, reported = oci_registry.manifest("fixture/art", "v1")
    assert reported == digest
    assert oci_registry.manifest("fixture/art", digest)[0] == manifest
    titles = {layer["annotations"]["org.opencontainers.image.title"]: layer for layer in manifest["layers"]}
    assert oci_registry.blob("fixture/art", titles["a.txt"]["digest"]) == b"hello"
    missing = requests.get(f"{oci_registry.url}/v2/fixture/art/manifests/v2", timeout=10)
    assert missing.status_code == 404


def test_auth_registry_refuses_anonymous_and_wrong_credentials(oci_registry_auth):
    registry = oci_registry_auth
    assert requests.get(f"{registry.url}/v2/", timeout=10).status_code == 401
    assert requests.get(f"{registry.url}/v2/", auth=(registry.username, "wrong"), timeout=10).status_code == 401
    assert requests.get(f"{registry.url}/v2/", auth=(registry.username, registry.password),
                        timeout=10).status_code == 200
    pushed = registry.push_blob("fixture/auth", b"secret-free bytes")
    assert pushed["digest"] == digest_of(b"secret-free bytes")
