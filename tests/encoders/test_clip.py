"""load_clip / ClipEncoder: tiny config, seeded init, checkpoints, normalisation, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from leverlm.encoders.clip import (
    ASSET_DIR,
    TINY_CLIP,
    ClipEncoder,
    EncoderError,
    load_clip,
    resolve_pretrained,
)


def _images(n: int, seed: int = 0, size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


TEXTS = ["what color is the circle?", "is there a red shape?", "a blue square", ""]


@pytest.fixture(scope="module")
def tiny() -> ClipEncoder:
    return load_clip(TINY_CLIP)


def test_tiny_config_is_what_the_encoder_builds(tiny: ClipEncoder) -> None:
    cfg = json.loads((ASSET_DIR / f"{TINY_CLIP}.json").read_text())
    assert tiny.dim == cfg["embed_dim"]
    assert tiny.tokenizer.context_length == cfg["text_cfg"]["context_length"]
    size = cfg["vision_cfg"]["image_size"]
    # Larger inputs are resized/cropped to the model's own resolution.
    pixels = tiny.preprocess_images(_images(2, size=100))
    assert pixels.shape == (2, 3, size, size)
    assert not tiny.model.training


def test_encodes_images_and_texts_as_float32_rows(tiny: ClipEncoder) -> None:
    with torch.no_grad():
        img = tiny.encode_images(_images(3))
        txt = tiny.encode_texts(TEXTS)
    assert img.shape == (3, tiny.dim) and img.dtype == torch.float32
    assert txt.shape == (len(TEXTS), tiny.dim) and txt.dtype == torch.float32
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    # Different inputs give different features (the encoder is not constant).
    assert not torch.allclose(img[0], img[1])
    assert not torch.allclose(txt[0], txt[1])


def test_rows_do_not_depend_on_the_batch(tiny: ClipEncoder) -> None:
    images = _images(4, seed=1)
    with torch.no_grad():
        together = tiny.encode_images(images)
        alone = torch.cat([tiny.encode_images([im]) for im in images])
        texts_together = tiny.encode_texts(TEXTS)
        texts_alone = torch.cat([tiny.encode_texts([t]) for t in TEXTS])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(texts_together, texts_alone, rtol=1e-4, atol=1e-5)


def test_random_init_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = load_clip(TINY_CLIP), load_clip(TINY_CLIP), load_clip(TINY_CLIP, seed=1)
    assert torch.equal(torch.rand(3), before)  # building models consumed no global randomness
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_normalize_gives_unit_rows_in_the_same_direction(tiny: ClipEncoder) -> None:
    unit = load_clip(TINY_CLIP, normalize=True)
    images = _images(3, seed=2)
    with torch.no_grad():
        raw_img, raw_txt = tiny.encode_images(images), tiny.encode_texts(TEXTS)
        img, txt = unit.encode_images(images), unit.encode_texts(TEXTS)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(len(TEXTS)))
    # The raw features are not unit length, so the flag did something.
    assert (raw_img.norm(dim=-1) - 1).abs().max() > 1e-2
    torch.testing.assert_close(img, raw_img / raw_img.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(txt, raw_txt / raw_txt.norm(dim=-1, keepdim=True))


def test_encoders_keep_gradients_for_a_trainable_clip() -> None:
    enc = load_clip(TINY_CLIP)
    enc.train()
    loss = enc.encode_images(_images(2)).pow(2).mean() + enc.encode_texts(TEXTS[:2]).mean()
    loss.backward()
    visual_grads = [p.grad for p in enc.model.visual.parameters() if p.requires_grad]
    text_grad = enc.model.token_embedding.weight.grad
    assert visual_grads and all(g is not None for g in visual_grads)
    assert text_grad is not None and text_grad.abs().sum() > 0


def test_loads_a_checkpoint_file(tmp_path) -> None:
    source = load_clip(TINY_CLIP, seed=7)
    ckpt = tmp_path / "tiny.pt"
    torch.save(source.model.state_dict(), ckpt)
    loaded = load_clip(TINY_CLIP, pretrained=str(ckpt), seed=0)
    default = load_clip(TINY_CLIP, seed=0)
    images = _images(2, seed=3)
    with torch.no_grad():
        want = source.encode_images(images)
        torch.testing.assert_close(loaded.encode_images(images), want)
        torch.testing.assert_close(loaded.encode_texts(TEXTS), source.encode_texts(TEXTS))
        assert not torch.allclose(default.encode_images(images), want)


def test_a_checkpoint_of_another_architecture_fails_naming_it(tmp_path) -> None:
    ckpt = tmp_path / "wrong.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, ckpt)
    with pytest.raises(EncoderError, match="wrong.pt"):
        load_clip(TINY_CLIP, pretrained=str(ckpt))


def test_missing_pretrained_file_fails_naming_it(tmp_path) -> None:
    missing = tmp_path / "no-such-checkpoint.pt"
    with pytest.raises(EncoderError, match="no-such-checkpoint.pt"):
        load_clip(TINY_CLIP, pretrained=str(missing))
    with pytest.raises(EncoderError, match="not a file"):
        load_clip(TINY_CLIP, pretrained=str(tmp_path))


def test_tags_resolve_from_the_local_cache_only(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    # Not cached: a clear error, no download attempt.
    with pytest.raises(EncoderError, match="'openai'.*not in the local cache"):
        resolve_pretrained("ViT-B-32", "openai")
    # Not a tag of this model and not a file.
    with pytest.raises(EncoderError, match="'laion-nonsense'"):
        resolve_pretrained("ViT-B-32", "laion-nonsense")
    # Cached in open_clip's URL cache: resolved to that file, with the tag's settings.
    cached = tmp_path / ".cache" / "clip" / "ViT-B-32.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    path, cfg = resolve_pretrained("ViT-B-32", "openai")
    assert path == str(cached)
    assert cfg["quick_gelu"] is True


def test_unknown_model_and_precision_fail_clearly() -> None:
    with pytest.raises(EncoderError, match="'ViT-B/33'"):
        load_clip("ViT-B/33")
    with pytest.raises(EncoderError, match="precision 'fp8'"):
        load_clip(TINY_CLIP, precision="fp8")


def test_random_init_of_another_model_warns(tmp_path) -> None:
    import open_clip

    # Any model other than the embedded tiny one without a checkpoint is a likely mistake.
    cfg = json.loads((ASSET_DIR / f"{TINY_CLIP}.json").read_text())
    (tmp_path / "test-other-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    with pytest.warns(UserWarning, match="'test-other-clip' has no checkpoint: random init"):
        enc = load_clip("test-other-clip")
    assert enc.dim == cfg["embed_dim"]


def test_low_precision_inputs_are_cast_and_outputs_stay_close(tiny: ClipEncoder) -> None:
    images = _images(2, seed=4)
    with torch.no_grad():
        want_img, want_txt = tiny.encode_images(images), tiny.encode_texts(TEXTS)
        for precision in ("bf16", "pure_bf16"):
            enc = load_clip(TINY_CLIP, precision=precision)
            assert enc.model.visual.conv1.weight.dtype == torch.bfloat16
            img, txt = enc.encode_images(images), enc.encode_texts(TEXTS)
            assert img.dtype == torch.float32  # rows come back in fp32 whatever the precision
            torch.testing.assert_close(img, want_img, rtol=0.05, atol=0.05)
            torch.testing.assert_close(txt, want_txt, rtol=0.05, atol=0.05)
