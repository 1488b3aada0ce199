"""OpenVLA preprocessing, prompt, prefix embedding, greedy decoding and the action-bin mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.openvla.config import DINO_MEAN, DINO_STD
from models.openvla.processing import (
    PROMPT_TEMPLATE,
    bin_centers,
    build_prompt,
    token_ids_to_normalized,
    unnormalize_actions,
)
from models.openvla.tiny import UNNORM_KEY, build_tiny


@pytest.fixture(scope="module")
def model():  # noqa: ANN201
    return build_tiny("tiny", seed=0)


def test_preprocess_shape_and_normalisation(model) -> None:  # noqa: ANN001
    gray = np.full((2, 100, 150, 3), 128, dtype=np.uint8)
    px = model.processor.preprocess_images(gray)
    size = model.config.vision_configs()[0].image_size
    assert px.shape == (2, 6, size, size)
    v = 128 / 255
    for c in range(3):
        assert torch.allclose(px[:, c], torch.tensor((v - DINO_MEAN[c]) / DINO_STD[c]), atol=1e-5)
        assert torch.allclose(px[:, 3 + c], torch.tensor((v - 0.5) / 0.5), atol=1e-5)


def test_center_crop_keeps_90_percent_area(model) -> None:  # noqa: ANN001
    img = np.zeros((100, 100, 3), dtype=np.uint8)
    img[:, :2] = 255  # a white stripe at the left border disappears after the 90%-area crop
    plain = model.processor.preprocess_images(img, center_crop=False)
    cropped = model.processor.preprocess_images(img, center_crop=True)
    assert plain[0, 3:, :, 0].max() > 0.5
    assert torch.allclose(cropped[0, 3:], torch.full_like(cropped[0, 3:], -1.0), atol=1e-4)


def test_prompt_and_tokens(model) -> None:  # noqa: ANN001
    p = build_prompt("put the bowl on the plate")
    assert p == PROMPT_TEMPLATE.format(instruction="put the bowl on the plate")
    assert p == "In: What action should the robot take to put the bowl on the plate?\nOut:"
    ids, mask = model.processor.tokenize([p, build_prompt("open the top drawer of the cabinet and more words")])
    assert (ids[:, -1] == model.processor.empty_token_id).all()  # Llama's 29871 analogue appended
    assert ids[1, 0] == 1 and mask[1].all()  # the longer row starts with BOS
    assert mask[0, 0] == 0 and ids[0, 0] == model.config.pad_token_id  # left padding


def test_embed_prefix_inserts_patches_after_bos(model) -> None:  # noqa: ANN001
    batch = model.processor(np.zeros((64, 64, 3), dtype=np.uint8), "pick up the cup")
    with torch.no_grad():
        emb = model.embed_prefix(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        patches = model.project_patches(batch["pixel_values"])
        tok = model.language_model.get_input_embeddings()(batch["input_ids"])
    p = model.num_patches
    assert emb.shape == (1, batch["input_ids"].shape[1] + p, model.language_model.config.hidden_size)
    assert torch.equal(emb[:, 0], tok[:, 0])
    assert torch.equal(emb[:, 1 : 1 + p], patches)
    assert torch.equal(emb[:, 1 + p :], tok[:, 1:])


def test_greedy_cache_matches_full_recompute(model) -> None:  # noqa: ANN001
    batch = model.processor(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8), "stack the cube")
    ids = model.generate_action_tokens(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], 4)
    seq = batch["input_ids"]
    ref = []
    with torch.no_grad():
        for _ in range(4):
            logits = model(batch["pixel_values"], seq)["logits"]
            nxt = logits[:, -1].argmax(-1)
            ref.append(nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(ids, torch.stack(ref, 1))


def test_batched_decoding_equals_single(model) -> None:  # noqa: ANN001
    rng = np.random.RandomState(2)
    imgs = [rng.randint(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    instr = ["pick up the cup", "put the black bowl in the top drawer of the cabinet"]
    both = model.processor(imgs, instr)
    ids = model.generate_action_tokens(both["pixel_values"], both["input_ids"], both["attention_mask"], 7)
    for i in range(2):
        one = model.processor(imgs[i], instr[i])
        single = model.generate_action_tokens(one["pixel_values"], one["input_ids"], one["attention_mask"], 7)
        assert torch.equal(ids[i], single[0])


def test_bin_mapping_matches_upstream_formula() -> None:
    vocab_base, n = 1024, 256
    centers = bin_centers(n)
    assert centers.shape == (255,)
    ids = np.array([vocab_base - 1, vocab_base - 2, vocab_base - 128, vocab_base - 256, vocab_base - 300, vocab_base + 5])
    got = token_ids_to_normalized(ids, vocab_base, n)
    expected_idx = np.clip(vocab_base - ids - 1, 0, 254)
    np.testing.assert_allclose(got, centers[expected_idx])
    assert got[0] == centers[0] and got[3] == centers[254]
    stats = {"q01": [-1.0, 0.0], "q99": [1.0, 2.0], "mask": [True, False]}
    np.testing.assert_allclose(unnormalize_actions(np.array([[0.5, 0.5]]), stats), [[0.5, 0.5]])
    np.testing.assert_allclose(unnormalize_actions(np.array([[-1.0, 0.3]]), {"q01": [0, 0], "q99": [4, 4]}), [[0.0, 2.6]])


def test_predict_action_shapes_and_tokens(model) -> None:  # noqa: ANN001
    img = np.random.RandomState(3).randint(0, 255, (64, 64, 3), dtype=np.uint8)
    a = model.predict_action(img, "pick up the cup", unnorm_key=UNNORM_KEY)
    assert a.shape == (7,)
    b = model.predict_action([img, img], ["pick up the cup", "pick up the cup"])
    assert b.shape == (2, 7)
    np.testing.assert_array_equal(b[0], a)
    # decode_actions on explicit action tokens: the last base id is bin 0 (centre -0.996 -> q01 side)
    ids = torch.full((1, 7), model.config.action_vocab_base - 1)
    out = model.decode_actions(ids, UNNORM_KEY)
    st = model.norm_stats[UNNORM_KEY]["action"]
    c0 = bin_centers(256)[0]
    exp = [0.5 * (c0 + 1) * (hi - lo) + lo for lo, hi in zip(st["q01"], st["q99"], strict=True)]
    exp[6] = c0  # gripper is masked out: passes through normalised
    np.testing.assert_allclose(out[0], exp)
    with pytest.raises(KeyError):
        model.predict_action(img, "x", unnorm_key="nope")


def test_encode_prompt_feature_is_last_hidden_state(model) -> None:  # noqa: ANN001
    batch = model.processor(np.zeros((64, 64, 3), dtype=np.uint8), "pick up the cup")
    state = model.encode_prompt(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        emb = model.embed_prefix(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        out = model.language_model(inputs_embeds=emb, output_hidden_states=True)
    assert torch.allclose(state.last_hidden, out.hidden_states[-1][:, -1], atol=1e-5)
    assert torch.allclose(state.logits, out.logits[:, -1], atol=1e-4)
    assert state.next_position.item() == emb.shape[1]


def test_pi_resized_patch_kernel_embeds_a_patch_as_the_old_one_embeds_it_upsampled() -> None:
    import torch.nn.functional as F

    from models.common.vit import resize_patch_embed, resize_pos_embed

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, 14, 14, generator=g)
    w8 = resize_patch_embed(w, 8)
    assert w8.shape == (6, 3, 8, 8)
    x = torch.randn(5, 3, 8, 8, generator=g)
    up = F.interpolate(x.double(), size=(14, 14), mode="bilinear", align_corners=False).float()
    torch.testing.assert_close(torch.einsum("dchw,nchw->nd", w8, x), torch.einsum("dchw,nchw->nd", w, up),
                               atol=1e-4, rtol=1e-4)
    assert torch.equal(resize_patch_embed(w, 14), w)
    pos = torch.randn(1, 64, 6, generator=g)
    assert torch.equal(resize_pos_embed(pos, 8), pos)  # the same grid is the identity
    fine = resize_pos_embed(pos, 14)
    assert fine.shape == (1, 196, 6)
    # a constant field stays constant
    torch.testing.assert_close(resize_pos_embed(torch.ones(1, 64, 6), 14), torch.ones(1, 196, 6))
    with pytest.raises(ValueError, match="square grid"):
        resize_pos_embed(torch.zeros(1, 60, 6), 8)


def test_repatch_keeps_every_weight_but_the_grid() -> None:
    from models.openvla.repatch import repatch

    small = build_tiny("small")
    fine = repatch(small, 8)
    assert (small.num_patches, fine.num_patches) == (64, 196)
    assert fine.config.timm_model_ids == ["small_vit_patch8_reg4_dinov2", "small_vit_patch8_siglip_112"]
    a, b = small.state_dict(), fine.state_dict()
    assert a.keys() == b.keys()
    regridded = {k for k in a if k.endswith(("patch_embed.proj.weight", ".pos_embed"))}
    assert len(regridded) == 4  # two towers, each a kernel and a position table
    assert all(torch.equal(a[k], b[k]) for k in a if k not in regridded)
    with torch.no_grad():
        assert fine.project_patches(torch.rand(1, 6, 112, 112)).shape == (1, 196, 192)
    with pytest.raises(ValueError, match="does not divide"):
        repatch(small, 10)
