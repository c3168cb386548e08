"""Real servers for the storage tests, an S3-compatible one (versitygw) and an OCI registry (distribution),
and tiny adapters to put in them."""

from __future__ import annotations

import pytest

from support.oci_registry import running_oci_registry
from support.s3_server import running_s3_server
from support.tiny_models import make_lora_adapter, make_tiny_llama


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    with running_s3_server(tmp_path_factory.mktemp("s3-server")) as server:
        yield server


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory):
    """An open registry (no auth), plain HTTP on loopback."""
    with running_oci_registry(tmp_path_factory.mktemp("oci-registry")) as registry:
        yield registry


@pytest.fixture(scope="session")
def oci_registry_auth(tmp_path_factory):
    """A registry behind htpasswd auth with random credentials."""
    with running_oci_registry(tmp_path_factory.mktemp("oci-registry-auth"), auth=True) as registry:
        yield registry


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """models/tiny, adapters/{a,b} on disk (uploaded to buckets by the tests)."""
    store = tmp_path_factory.mktemp("store")
    base = make_tiny_llama(store / "models" / "tiny", max_shard_size="40KB")
    make_lora_adapter(store / "adapters" / "a", base, r=4, alpha=8, target_modules=("q_proj", "v_proj"), seed=1)
    make_lora_adapter(store / "adapters" / "b", base, r=2, alpha=4, target_modules=("q_proj", "o_proj"), seed=2)
    return store


@pytest.fixture
def bucket(s3_server):
    """A fresh, empty bucket."""
    import secrets

    name = "test-" + secrets.token_hex(6)
    s3_server.client().create_bucket(Bucket=name)
    return name
