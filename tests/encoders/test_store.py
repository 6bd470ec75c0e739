"""open_store: the one reader of feature stores, checked against the collection by sha256."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from helpers.features import NO_COLLECTION_SHA256, write_store
from helpers.lever_world import write_vqa_collection

from leverlm.encoders.store import FeatureStore, FeatureStoreError, open_store
from leverlm.utils import sha256_file


def test_open_store_checks_the_collection_by_its_manifest_sha256(tmp_path) -> None:
    rng = np.random.default_rng(0)
    image, text = (rng.standard_normal((6, 4)) for _ in range(2))
    coll = write_vqa_collection(tmp_path / "coll", 6)
    store = write_store(tmp_path / "store", image, text, coll)
    opened = open_store(store, coll)
    assert isinstance(opened, FeatureStore) and opened.image.shape == (6, 4)
    sha = sha256_file(coll / "manifest.json")
    assert open_store(store, sha256=sha).path == store  # the hash alone, as a gt manifest has it
    # same size, another collection: refused, naming the parameter
    other = write_vqa_collection(tmp_path / "other", 6, seed=1)
    with pytest.raises(FeatureStoreError, match="data.support_features: feature store .* built"):
        open_store(store, other, what="data.support_features")
    with pytest.raises(FeatureStoreError, match="was built for"):
        open_store(store, sha256=NO_COLLECTION_SHA256)
    with pytest.raises(FeatureStoreError, match="query_features: .* does not exist"):
        open_store(tmp_path / "nope", what="query_features")
    # an open store (anything with image/text arrays) passes through unchecked
    ready = SimpleNamespace(image=image, text=text)
    assert open_store(ready, coll) is ready
