"""OpenVLA preprocessing against upstream Prismatic's facts, each expected value computed independently with PIL.

Upstream (``prismatic/models/backbones/vision/base_vision.py``, ``dinosiglip_vit.py``): ``resize-naive`` resizes to
``S x S``; ``resize-crop`` is timm's eval transform (``Resize(S)`` on the shorter side + ``CenterCrop(S)``);
``letterbox`` pads symmetrically with ``int(mean * 255)`` of each featurizer's normalisation mean, then resizes.
The prompt is ``In: What action should the robot take to {instruction.lower()}?\\nOut:`` with nothing stripped.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from models.openvla.config import DINO_MEAN, DINO_STD, SIGLIP_MEAN, SIGLIP_STD
from models.openvla.processing import OpenVLAProcessor, build_prompt
from models.openvla.tiny import build_tiny

# Rounding of PIL's 8-bit bicubic against the float resize here; a misplaced crop or a wrong fill is far larger.
ATOL_01 = 2.0 / 255.0


@pytest.fixture(scope="module")
def model():  # noqa: ANN201
    return build_tiny("tiny", seed=0)


def _processor(model, strategy: str) -> OpenVLAProcessor:  # noqa: ANN001
    cfg = dataclasses.replace(model.config, image_resize_strategy=strategy)
    return OpenVLAProcessor(cfg, model.processor.tokenizer)


def _smooth_image(h: int, w: int) -> np.ndarray:
    """A smooth non-square colour image whose left and right quarters differ from its centre."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([255 * xx / (w - 1), 255 * yy / (h - 1), 128 + 100 * np.sin(xx / 7.0)], axis=-1)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _unnormalize(px: torch.Tensor, k: int, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Featurizer ``k``'s slice of ``pixel_values`` back on the [0, 1] scale, HWC."""
    part = px[0, 3 * k : 3 * k + 3]
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (part * s + m).permute(1, 2, 0).numpy()


def _pil_resize_crop(img: Image.Image, size: int) -> np.ndarray:
    """Shorter side to ``size`` (longer truncated as torchvision does), then the centre ``size x size``."""
    w, h = img.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    r = img.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - size) / 2)), int(round((nh - size) / 2))
    return np.asarray(r.crop((left, top, left + size, top + size)), dtype=np.float64) / 255.0


def test_resize_crop_is_shorter_side_resize_then_centre_crop(model) -> None:  # noqa: ANN001
    img = _smooth_image(60, 150)
    size = model.config.vision_configs()[0].image_size
    proc = _processor(model, "resize-crop")
    px = proc.preprocess_images(img)
    assert px.shape == (1, 6, size, size)
    expected = _pil_resize_crop(Image.fromarray(img), size)
    for k, (mean, std) in enumerate(((DINO_MEAN, DINO_STD), (SIGLIP_MEAN, SIGLIP_STD))):
        got = _unnormalize(px, k, mean, std)
        assert np.abs(got - expected).max() <= ATOL_01
    # resize-naive keeps the whole width (it squashes), so it must differ from the crop.
    naive = _unnormalize(_processor(model, "resize-naive").preprocess_images(img), 0, DINO_MEAN, DINO_STD)
    assert np.abs(naive - expected).max() > 0.1


def test_resize_crop_tall_image(model) -> None:  # noqa: ANN001
    img = _smooth_image(150, 61)
    size = model.config.vision_configs()[0].image_size
    got = _unnormalize(_processor(model, "resize-crop").preprocess_images(img), 1, SIGLIP_MEAN, SIGLIP_STD)
    assert np.abs(got - _pil_resize_crop(Image.fromarray(img), size)).max() <= ATOL_01


@pytest.mark.parametrize("hw", [(40, 100), (41, 100), (100, 40)])
def test_letterbox_pads_with_int_mean_colour_per_featurizer(model, hw: tuple[int, int]) -> None:  # noqa: ANN001
    h, w = hw
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[..., 0] = 250  # red content: far from either fill colour
    size = model.config.vision_configs()[0].image_size
    px = _processor(model, "letterbox").preprocess_images(img)
    for k, (mean, std) in enumerate(((DINO_MEAN, DINO_STD), (SIGLIP_MEAN, SIGLIP_STD))):
        fill = tuple(int(m * 255) for m in mean)
        side = max(h, w)
        ph, pw = int((side - h) / 2), int((side - w) / 2)
        canvas = Image.new("RGB", (w + 2 * pw, h + 2 * ph), fill)
        canvas.paste(Image.fromarray(img), (pw, ph))
        expected = _pil_resize_crop(canvas, size)
        got = _unnormalize(px, k, mean, std)
        assert np.abs(got - expected).max() <= ATOL_01
        np.testing.assert_allclose(got[0, 0], np.array(fill) / 255.0, atol=1e-5)
    # DINO's fill is (123, 116, 103), SigLIP's (127, 127, 127): the two featurizers see different borders.
    dino_corner = _unnormalize(px, 0, DINO_MEAN, DINO_STD)[0, 0]
    siglip_corner = _unnormalize(px, 1, SIGLIP_MEAN, SIGLIP_STD)[0, 0]
    np.testing.assert_allclose(dino_corner * 255, [123, 116, 103], atol=1e-3)
    np.testing.assert_allclose(siglip_corner * 255, [127, 127, 127], atol=1e-3)


def test_prompt_keeps_a_trailing_question_mark_and_lower_cases() -> None:
    assert build_prompt("Is the bowl on the plate?") == (
        "In: What action should the robot take to is the bowl on the plate??\nOut:"
    )
    assert build_prompt("pick up the bowl") == "In: What action should the robot take to pick up the bowl?\nOut:"


def test_unknown_strategy_is_rejected(model) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="image_resize_strategy"):
        _processor(model, "stretch").preprocess_images(_smooth_image(10, 10))
