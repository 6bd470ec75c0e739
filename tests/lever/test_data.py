"""Lever-LM training data: anchor split, sequence batches, gt filtering."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.lever_world import make_world, write_gt, write_store, write_vqa_collection


def test_split_is_seeded_disjoint_and_order_independent():
    from leverlm.lever.data import split_anchors

    anchors = list(range(100))
    train, val = split_anchors(anchors, 0.1, seed=3)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == anchors
    assert split_anchors(anchors[::-1], 0.1, seed=3) == (train, val)
    assert split_anchors(anchors, 0.1, seed=4) != (train, val)
    # tiny sets keep both sides non-empty
    tr, va = split_anchors([5, 9], 0.1, seed=0)
    assert len(tr) == 1 and len(va) == 1


def test_datamodule_batches_features_and_all_beams(tmp_path):
    from leverlm.lever.data import LeverLMDataModule
    from leverlm.lever.model import IGNORE_INDEX

    w = make_world(tmp_path, num_anchors=10, beams=3)
    dm = LeverLMDataModule(
        str(w.gt_dir), support_features=str(w.store_dir), batch_size=4, val_fraction=0.2
    )
    assert dm.num_icds == 32 and dm.feature_dim == 16
    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 30  # every beam of every anchor
    train_anchors = {p for p, _ in dm.train_dataset.items}
    val_anchors = {p for p, _ in dm.val_dataset.items}
    assert len(val_anchors) == 2 and not train_anchors & val_anchors
    batch = next(iter(dm.val_dataloader()))
    N = w.num_icds
    tokens, targets = batch["tokens"], batch["targets"]
    assert tokens.shape == (4, 4)
    assert (tokens[:, 0] == N + 1).all() and (tokens[:, 1] == N + 2).all()
    for b in range(4):
        q = int(batch["query_position"][b])
        seq = tokens[b, 2:].tolist()
        assert seq in w.sequences[q]
        assert targets[b].tolist() == [IGNORE_INDEX, *seq, N]
        np.testing.assert_allclose(batch["query_feats"]["image"][b].float().numpy(), w.image[q])
        np.testing.assert_allclose(batch["query_feats"]["text"][b].float().numpy(), w.text[q])
        for t, p in enumerate(seq, start=2):
            np.testing.assert_allclose(
                batch["icd_feats"]["image"][b, t].float().numpy(), w.image[p]
            )
            np.testing.assert_allclose(batch["icd_feats"]["text"][b, t].float().numpy(), w.text[p])


def test_score_threshold_and_construction_order(tmp_path):
    from leverlm.lever.data import LeverLMDataModule

    seqs = {0: [[1, 2], [3, 4]], 5: [[6, 7], [8, 9]]}
    scores = {0: [0.9, 0.1], 5: [0.05, 0.01]}
    write_gt(tmp_path / "gt", seqs, num_icds=10, order="left", scores=scores)
    dm = LeverLMDataModule(str(tmp_path / "gt"), score_threshold=0.5, val_fraction=0.0)
    dm.setup()
    assert dm.train_dataset.items == [(0, (1, 2))]  # anchor 5 has no beam left
    dm = LeverLMDataModule(str(tmp_path / "gt"), sequence_order="construction", val_fraction=0.0)
    dm.setup()
    assert (0, (2, 1)) in dm.train_dataset.items  # order=left: construction = reversed prompt
    write_gt(tmp_path / "gt_r", seqs, num_icds=10, order="right")
    dm = LeverLMDataModule(str(tmp_path / "gt_r"), sequence_order="construction", val_fraction=0.0)
    dm.setup()
    assert (0, (1, 2)) in dm.train_dataset.items
    dm = LeverLMDataModule(str(tmp_path / "gt"), score_threshold=5.0)
    with pytest.raises(ValueError, match="score_threshold"):
        dm.setup()


def test_bad_gt_inputs_fail_early_naming_the_problem(tmp_path):
    from leverlm.gt.data import GtDataError
    from leverlm.lever.data import LeverLMDataModule

    with pytest.raises(GtDataError, match="not found"):
        LeverLMDataModule(str(tmp_path / "missing"))
    write_gt(tmp_path / "gt", {0: [[1, 12]]}, num_icds=10)
    with pytest.raises(GtDataError, match=r"\[12\].*num_samples"):
        LeverLMDataModule(str(tmp_path / "gt"))
    w = make_world(tmp_path / "w", num_icds=20)
    # a store of another collection, told apart by the collection's manifest sha256
    coll = write_vqa_collection(tmp_path / "other-coll", 5)
    other = write_store(tmp_path / "other", w.image[:5], w.text[:5], coll)
    with pytest.raises(ValueError, match="support_features: feature store .* was built for"):
        LeverLMDataModule(str(w.gt_dir), support_features=str(other))
    with pytest.raises(ValueError, match="data.support_features is required"):
        LeverLMDataModule(str(w.gt_dir), query_features=["image"])
    with pytest.raises(ValueError, match="sequence_order"):
        LeverLMDataModule(str(w.gt_dir), support_features=str(w.store_dir), sequence_order="random")


def test_sorted_split_is_the_first_90_percent_of_sorted_anchors_before_the_filter(tmp_path):
    """The authors' split: the first int(0.9 n) anchor ids in ascending order train, the rest
    validate; all anchors take part, also those the score filter leaves without beams."""
    from leverlm.lever.data import LeverLMDataModule, split_anchors

    anchors = [17, 3, 25, 8, 11, 1, 30, 14, 6, 21, 9, 27]
    train, val = split_anchors(anchors, 0.1, seed=0, split="sorted")
    assert train == sorted(anchors)[:10] and val == sorted(anchors)[10:]  # int(0.9 * 12) = 10
    assert split_anchors(list(range(25)), 0.1, seed=5, split="sorted")[1] == [22, 23, 24]
    seqs = {a: [[(a + 1) % 40, (a + 2) % 40]] for a in anchors}
    scores = {a: [-0.5 if a == 30 else 0.2] for a in anchors}
    write_gt(tmp_path / "gt", seqs, num_icds=40, scores=scores)
    dm = LeverLMDataModule(
        str(tmp_path / "gt"), val_fraction=0.1, split="sorted", score_threshold=0.0
    )
    dm.setup()
    assert [a for a, _ in dm.train_dataset.items] == sorted(anchors)[:10]
    assert [a for a, _ in dm.val_dataset.items] == [27]  # 30 was split to val, then filtered
    with pytest.raises(ValueError, match="data.split"):
        LeverLMDataModule(str(tmp_path / "gt"), split="first")


def test_score_threshold_keeps_scores_equal_to_it(tmp_path):
    """The authors drop beams scoring below the threshold (0.0): a score of exactly 0.0 stays."""
    from leverlm.lever.data import LeverLMDataModule

    seqs = {0: [[1, 2], [3, 4], [5, 6]]}
    write_gt(tmp_path / "gt", seqs, num_icds=10, scores={0: [0.25, 0.0, -1e-9]})
    dm = LeverLMDataModule(str(tmp_path / "gt"), score_threshold=0.0, val_fraction=0.0)
    dm.setup()
    assert dm.train_dataset.items == [(0, (1, 2)), (0, (3, 4))]


def test_query_text_of_a_caption_task_is_refused(tmp_path):
    from leverlm.lever import LeverLMError
    from leverlm.lever.data import LeverLMDataModule

    w = make_world(tmp_path, num_icds=20)
    cap = write_gt(tmp_path / "cap", w.sequences, num_icds=20, task="caption")
    store = str(w.store_dir)
    with pytest.raises(
        LeverLMError, match=r"model.query_features=\['image', 'text'\] on a 'caption'"
    ):
        LeverLMDataModule(str(cap), support_features=store, query_features=["image", "text"])
    dm = LeverLMDataModule(str(cap), support_features=store, query_features=["image"])
    assert dm.query_features == ["image"]
    vqa = LeverLMDataModule(str(w.gt_dir), support_features=store, query_features=["text"])
    assert vqa.query_features == ["text"]
