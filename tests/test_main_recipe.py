"""The shipped OpenVLA-RSD training recipe: per-layer loss weights and the ``small`` backbone preset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rsd_helpers import tiny_main

from models.openvla.tiny import PRESETS, build_tiny, save_pretrained
from rsd.train_vla import build_parser, parse_layer_weights


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, 32, generator=g), torch.randint(0, 7, (3, 8, 128), generator=g)


def test_layer_weights_weigh_each_layers_mean_cross_entropy() -> None:
    main = tiny_main(sharpen=3.0)
    embeds, layers = _batch()
    plain, logits = main(embeds, layers)
    per_layer = torch.stack([F.cross_entropy(logits[:, i].reshape(-1, 7), layers[:, i].reshape(-1))
                             for i in range(8)])
    # equal weights (any scale) are the unweighted loss; a one-hot weight is that layer's cross-entropy alone
    assert torch.allclose(main(embeds, layers, layer_weights=torch.full((8,), 3.0))[0], plain, atol=1e-6)
    only2 = torch.zeros(8)
    only2[2] = 1.0
    assert torch.allclose(main(embeds, layers, layer_weights=only2)[0], per_layer[2], atol=1e-6)
    w = torch.tensor([8, 4, 4, 2, 1, 0.5, 0.5, 0.5])
    assert torch.allclose(main(embeds, layers, layer_weights=w)[0], (per_layer * w).sum() / w.sum(), atol=1e-6)
    assert not torch.allclose(per_layer, per_layer.mean().expand(8))  # the weighting is not a no-op here


def test_layer_weights_only_train_the_weighted_layers_head_rows() -> None:
    main = tiny_main()
    embeds, layers = _batch(1)
    only0 = torch.zeros(8)
    only0[0] = 1.0
    main(embeds, layers, layer_weights=only0)[0].backward()
    # layer 0 is read from the prefix only, so no layer token's embedding gets a gradient
    assert main.layer_embed.weight.grad is None or float(main.layer_embed.weight.grad.abs().sum()) == 0.0
    assert float(main.head.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("bad", [torch.ones(7), torch.tensor([1.0, -1, 1, 1, 1, 1, 1, 1]), torch.zeros(8)])
def test_bad_layer_weights_are_refused(bad: torch.Tensor) -> None:
    main = tiny_main()
    embeds, layers = _batch()
    with pytest.raises(ValueError, match="layer_weights"):
        main(embeds, layers, layer_weights=bad)


def test_layer_weights_flag() -> None:
    assert parse_layer_weights("") is None
    assert parse_layer_weights("8,4,4,2,1,0.5,0.5,0.5") == [8, 4, 4, 2, 1, 0.5, 0.5, 0.5]
    for bad in ("8,x", "-1,1", "0,0"):
        with pytest.raises(SystemExit, match="--layer-weights"):
            parse_layer_weights(bad)
    args = build_parser().parse_args(["main", "--demos", "d", "--rfsq", "r", "--out", "o"])
    assert args.layer_weights == "" and args.preset == "tiny"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["main", "--demos", "d", "--rfsq", "r", "--out", "o", "--preset", "huge"])
    assert args.extra_share is None  # DAgger labels at their plain share unless --extra-share says otherwise
    shared = build_parser().parse_args(["main", "--demos", "d", "--rfsq", "r", "--out", "o", "--extra-share", "0.2"])
    assert shared.extra_share == 0.2
    with pytest.raises(SystemExit):  # the draft distils the main model: no batch mix to set there
        build_parser().parse_args(["draft", "--demos", "d", "--model", "m", "--extra-share", "0.2"])


def test_small_preset_is_bigger_and_loads_through_the_released_loader(tmp_path) -> None:  # noqa: ANN001
    import models

    assert PRESETS == ("tiny", "small", "small_wide_vision", "small_p8", "medium")
    tiny, small = build_tiny("tiny"), build_tiny("small")
    n_tiny, n_small = (sum(p.numel() for p in m.parameters()) for m in (tiny, small))
    assert n_small > 1.5 * n_tiny and n_small < 4e6  # shipped size limit is 30 MB: 4 M fp32 parameters is 16 MB
    save_pretrained(small, tmp_path, num_shards=2)
    loaded = models.load_pretrained("openvla", tmp_path)
    assert loaded.config.text_config["hidden_size"] == 192
    assert loaded.config.vision_configs()[0].embed_dim == 96
    for (name, a), (_, b) in zip(small.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_small_wide_vision_preset_grows_only_the_vision_towers(tmp_path) -> None:  # noqa: ANN001
    import models

    small, wide = build_tiny("small"), build_tiny("small_wide_vision")
    assert wide.config.text_config == small.config.text_config
    assert [(v.embed_dim, v.depth) for v in wide.config.vision_configs()] == [(128, 3), (128, 3)]
    n_small, n_wide = (sum(p.numel() for p in m.parameters()) for m in (small, wide))
    assert n_small < n_wide < 4e6  # within the 30 MB limit even in fp32
    save_pretrained(wide, tmp_path, num_shards=2)
    loaded = models.load_pretrained("openvla", tmp_path)
    for (name, a), (_, b) in zip(wide.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_small_p8_preset_sees_a_finer_grid_through_the_released_loader(tmp_path) -> None:  # noqa: ANN001
    import models

    small, fine = build_tiny("small"), build_tiny("small_p8")
    assert fine.config.text_config == small.config.text_config
    assert [v.patch_size for v in fine.config.vision_configs()] == [8, 8]
    assert (small.num_patches, fine.num_patches) == (64, 196)  # 8x8 and 14x14 per 112 px camera
    save_pretrained(fine, tmp_path, num_shards=2)
    loaded = models.load_pretrained("openvla", tmp_path)
    assert loaded.num_patches == 196
    for (name, a), (_, b) in zip(fine.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    pixels = torch.rand(1, 6, 112, 112)
    with torch.no_grad():
        assert torch.equal(fine.project_patches(pixels), loaded.project_patches(pixels))
