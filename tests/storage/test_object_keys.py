"""Object keys below a source's prefix become paths in the scratch folder: only plain relative ones.
(The posix backend of the test server cannot hold such keys, so this is checked on the function.)"""

from __future__ import annotations

import pytest

from merge_worker.spec import SpecError
from merge_worker.storage.download import check_relative_key


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a/.", "", "a\0b"])
def test_keys_that_would_leave_the_scratch_folder_are_refused(key):
    with pytest.raises(SpecError) as caught:
        check_relative_key(key, "spec.adapters[0].uri", "s3://b/p")
    assert caught.value.field == "spec.adapters[0].uri"


@pytest.mark.parametrize("key", ["adapter_model.safetensors", "sub/dir/file.json", "a..b"])
def test_plain_keys_pass(key):
    check_relative_key(key, "spec.adapters[0].uri", "s3://b/p")
