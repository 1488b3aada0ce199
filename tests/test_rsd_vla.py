"""OpenVLA-RSD's optional OFT-style inputs (rsd/vla.py): proprio token and wrist-camera patches.

Tiny random models: this checks the prefix layout, that each input reaches the layer-0 logits, the checkpoint
round trip and that the default (image + instruction) model is untouched; not policy quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from models.openvla import tiny
from models.openvla.tiny import save_pretrained
from rsd.normalization import ActionNormalizer
from rsd.rfsq import RFSQAutoencoder, RFSQConfig, RFSQTokenizer
from rsd.vla import PROPRIO_PROJECTOR, RSD_CONFIG, RSD_DIR, OpenVLARSD, VLARSDConfig, load_openvla_rsd

torch.set_num_threads(1)
INSTRUCTIONS = ["pick up the black bowl and place it on the plate", "put the bowl on the cookie box"]


def _tokenizer(seed: int = 0) -> RFSQTokenizer:
    torch.manual_seed(seed)
    model = RFSQAutoencoder(RFSQConfig(hidden_dim=32))
    with torch.no_grad():
        model.calibrate(model.encode_latent(torch.rand(256, 8, 7) * 2 - 1))
    return RFSQTokenizer(model, ActionNormalizer(q01=-np.ones(7), q99=np.ones(7)))


def _model(**cfg) -> OpenVLARSD:
    torch.manual_seed(0)
    model = OpenVLARSD(tiny.build_tiny("tiny", seed=0), VLARSDConfig(**cfg)).eval()
    model.tokenizer = _tokenizer()
    return model


def _inputs(seed: int = 0, batch: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "images": rng.integers(0, 255, (batch, 128, 128, 3), dtype=np.uint8),
        "wrist_images": rng.integers(0, 255, (batch, 128, 128, 3), dtype=np.uint8),
        "states": rng.standard_normal((batch, 8)).astype(np.float32),
    }


@torch.no_grad()
def _layer0_logits(model: OpenVLARSD, inputs: dict, instructions: list[str] | None = None) -> torch.Tensor:
    """Main's first-layer logits (read at the last prefix position) for ``inputs``."""
    embeds, mask = model.prefix(
        inputs["images"],
        instructions or INSTRUCTIONS[: len(inputs["images"])],
        states=inputs["states"],
        wrist_images=inputs["wrist_images"],
    )
    layers = torch.zeros(embeds.shape[0], model.cfg.num_layers, model.cfg.codes_per_layer, dtype=torch.long)
    _, logits = model.main(embeds, layers, mask)
    return logits[:, 0]


def test_default_prefix_unchanged_and_ignores_extra_inputs() -> None:
    model = _model()
    assert model.proprio_projector is None and model.input_keys == ["image", "instruction"]
    x = _inputs()
    with torch.no_grad():
        plain, plain_mask = model.prefix(x["images"], INSTRUCTIONS)
        extra, extra_mask = model.prefix(
            x["images"], INSTRUCTIONS, states=x["states"], wrist_images=x["wrist_images"]
        )
        ids, mask = model.processor.tokenize(
            [f"In: What action should the robot take to {i}?\nOut:" for i in INSTRUCTIONS]
        )
        ref = model.backbone.embed_prefix(model.processor.preprocess_images(x["images"], True), ids, mask)
    assert torch.equal(plain, extra) and torch.equal(plain_mask, extra_mask)
    assert torch.equal(plain, ref)
    assert plain.shape[1] == ids.shape[1] + model.backbone.num_patches


def test_proprio_wrist_prefix_layout_and_inputs_reach_logits() -> None:
    base, model = (
        _model(),
        _model(use_proprio=True, use_wrist_image=True, proprio_mean=[0.1] * 8, proprio_std=[2.0] * 8),
    )
    assert model.input_keys == ["image", "wrist_image", "state", "instruction"]
    x = _inputs()
    with torch.no_grad():
        old, _ = base.prefix(x["images"], INSTRUCTIONS)
        new, mask = model.prefix(
            x["images"], INSTRUCTIONS, states=x["states"], wrist_images=x["wrist_images"]
        )
    assert new.shape[1] == old.shape[1] + model.backbone.num_patches + 1
    assert mask.shape == new.shape[:2]
    # The instructions differ in length: row padding stays on the left, every new position is attended.
    pad = (mask == 0).sum(1)
    assert int(pad.max()) > 0 and all(bool(mask[b, int(p) :].all()) for b, p in enumerate(pad))
    # The third-person part of the prefix is the default model's (same seed -> same backbone).
    p = model.backbone.num_patches
    for b, n_pad in enumerate(pad.tolist()):
        assert torch.equal(new[b, : n_pad + 1 + p], old[b, : n_pad + 1 + p])
        assert torch.equal(new[b, n_pad + 1 + 2 * p : -1], old[b, n_pad + 1 + p :])
    ref = _layer0_logits(model, x)
    moved_state = dict(x, states=x["states"] + 1.0)
    moved_wrist = dict(x, wrist_images=255 - x["wrist_images"])
    assert not torch.allclose(_layer0_logits(model, moved_state), ref)
    assert not torch.allclose(_layer0_logits(model, moved_wrist), ref)
    assert torch.equal(_layer0_logits(model, x), ref)


def test_missing_inputs_raise_value_error() -> None:
    x = _inputs()
    with pytest.raises(ValueError, match="states"):
        _model(use_proprio=True).prefix(x["images"], INSTRUCTIONS)
    with pytest.raises(ValueError, match="wrist_images"):
        _model(use_wrist_image=True).prefix(x["images"], INSTRUCTIONS, states=x["states"])
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        _model(use_proprio=True).prefix(x["images"], INSTRUCTIONS, states=x["states"][:, :7])


def test_save_load_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    model = _model(use_proprio=True, use_wrist_image=True, proprio_mean=[0.5] * 8, proprio_std=[3.0] * 8)
    with torch.no_grad():  # a trained projector, not the init, must come back
        for p in model.proprio_projector.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_pretrained(model.backbone, tmp_path, num_shards=2)
    model.save_rsd(tmp_path)
    assert (tmp_path / RSD_DIR / PROPRIO_PROJECTOR).is_file()
    saved = json.loads((tmp_path / RSD_DIR / RSD_CONFIG).read_text())
    assert saved["use_proprio"] and saved["use_wrist_image"] and saved["proprio_std"] == [3.0] * 8
    loaded = load_openvla_rsd(tmp_path, with_draft=False)
    x = _inputs(seed=1)
    assert torch.equal(_layer0_logits(loaded, x), _layer0_logits(model, x))


def test_config_without_new_keys_loads_as_before(tmp_path: Path) -> None:
    model = _model()
    save_pretrained(model.backbone, tmp_path, num_shards=2)
    model.save_rsd(tmp_path)
    cfg_file = tmp_path / RSD_DIR / RSD_CONFIG
    old = {
        k: v for k, v in json.loads(cfg_file.read_text()).items() if not k.startswith(("use_", "proprio_"))
    }
    cfg_file.write_text(json.dumps(old))  # what the shipped checkpoint's config looks like
    loaded = load_openvla_rsd(tmp_path, with_draft=False)
    assert not loaded.cfg.use_proprio and not loaded.cfg.use_wrist_image and loaded.proprio_projector is None
    assert not (tmp_path / RSD_DIR / PROPRIO_PROJECTOR).exists()
    x = _inputs(seed=2)
    assert torch.equal(_layer0_logits(loaded, x), _layer0_logits(model, x))


def _write_demos(path: Path, n_demos: int = 4, steps: int = 12, seed: int = 0) -> None:
    """A small rendered-layout LIBERO file: agent view, wrist view and 8-D state (as test_vla_pipeline)."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for d in range(n_demos):
            g = data.create_group(f"demo_{d}")
            g.create_dataset("actions", data=rng.uniform(-0.9, 0.9, (steps, 7)).astype(np.float32))
            g.attrs["language_instruction"] = INSTRUCTIONS[d % 2]
            obs = g.create_group("obs")
            img = rng.integers(0, 255, (steps, 64, 64, 3), dtype=np.uint8)
            obs.create_dataset("agentview_rgb", data=img)
            obs.create_dataset("eye_in_hand_rgb", data=img[:, ::-1])
            obs.create_dataset("state_8d", data=rng.standard_normal((steps, 8)).astype(np.float32))


def _train_main(tmp_path: Path, demos: Path, out: Path, *extra: str) -> int:
    from rsd import train_vla

    _tokenizer().save_pretrained(tmp_path / "rfsq")
    return train_vla.main(["main", "--demos", str(demos), "--rfsq", str(tmp_path / "rfsq"), "--out", str(out),
                           "--steps", "2", "--batch-size", "4", "--save-every", "2", "--heldout-frac", "0.5", *extra])


def test_train_vla_main_and_draft_with_proprio_and_wrist(tmp_path: Path) -> None:
    from rsd import train_vla

    demos = tmp_path / "demos.hdf5"
    _write_demos(demos)
    out = tmp_path / "model"
    assert _train_main(tmp_path, demos, out, "--proprio", "--wrist") == 0
    cfg = json.loads((out / RSD_DIR / RSD_CONFIG).read_text())
    assert cfg["use_proprio"] and cfg["use_wrist_image"] and len(cfg["proprio_mean"]) == 8
    assert all(s > 0 for s in cfg["proprio_std"])
    assert (out / RSD_DIR / PROPRIO_PROJECTOR).is_file()
    assert train_vla.main(["draft", "--model", str(out), "--demos", str(demos), "--steps", "2", "--max-samples", "16",
                           "--heldout-frac", "0.5"]) == 0
    model = load_openvla_rsd(out)
    assert model.draft is not None and model.cfg.use_proprio and model.cfg.use_wrist_image


def test_train_vla_flag_needs_data(tmp_path: Path) -> None:
    demos = tmp_path / "demos.hdf5"
    _write_demos(demos, n_demos=2, steps=10)
    with h5py.File(demos, "a") as f:
        for g in f["data"].values():
            del g["obs"]["state_8d"]
    with pytest.raises(SystemExit, match="state_8d"):
        _train_main(tmp_path, demos, tmp_path / "model", "--proprio")


def test_served_policy_requires_and_uses_state_and_wrist() -> None:
    from client.testing import libero_observation
    from rsd.config import RSDConfig
    from rsd.draft import DeepDraftConfig, DeepDraftModel
    from server.policies.base import PolicyInputError
    from server.policies.model_policies import OpenVLARSDPolicy

    model = _model(use_proprio=True, use_wrist_image=True)
    model.draft = DeepDraftModel(DeepDraftConfig(input_dim=model.hidden_size, hidden_dim=32)).eval()
    policy = OpenVLARSDPolicy(model, "tiny", RSDConfig(mode="exact"), {})  # calibrates with zero state/wrist
    assert policy.metadata()["inputs"] == ["image", "wrist_image", "state", "instruction"]
    obs = libero_observation(0, size=64, instruction=INSTRUCTIONS[0])
    policy.validate(obs)
    for key in ("state", "wrist_image"):
        with pytest.raises(PolicyInputError, match=key):
            policy.validate({k: v for k, v in obs.items() if k != key})
    ref = policy.infer([obs])[0].actions
    assert ref.shape == (8, 7)
    moved = dict(obs, state=obs["state"] + 5.0)
    batch = policy.infer([obs, moved])
    np.testing.assert_allclose(batch[0].actions, ref, atol=1e-5)  # batching only reorders float sums


def _state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rsd_on_an_oft_backbone_init_train_draft_and_serve(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``main --init <OpenVLA-OFT dir>``: the OFT's backbone and proprio projector initialise the RSD model (the L1
    head is unused), the result is a plain OpenVLA-RSD directory: ``draft`` trains on it, ``openvla-rsd`` serves it.
    """
    import logging

    from client.testing import libero_observation
    from models.openvla import oft
    from rsd import train_vla
    from server.config import ServerConfig
    from server.policies import create_policy

    oft_dir = oft.build_tiny_dir(tmp_path / "openvla-7b-oft-tiny")  # the released layout (tests/test_openvla_oft.py)
    plain = tmp_path / "openvla-tiny"
    save_pretrained(tiny.build_tiny("tiny", seed=0), plain)
    assert oft.is_oft_dir(oft_dir) and not oft.is_oft_dir(plain)
    ref = oft.load(oft_dir)
    demos = tmp_path / "demos.hdf5"
    _write_demos(demos)

    # In process: the backbone _build_backbone returns is the OFT's, the proprio projector is copied from its file.
    argv = ["main", "--demos", str(demos), "--rfsq", "unused", "--out", "unused", "--init", str(oft_dir), "--proprio"]
    with caplog.at_level(logging.INFO, logger="rsd.train_vla"):
        args = train_vla.build_parser().parse_args([*argv, "--wrist"])
        backbone = train_vla._build_backbone(args)
        assert _state_dicts_equal(backbone.state_dict(), ref.vla.state_dict())
        init = train_vla._oft_init(args, backbone.norm_stats)
        assert init is not None and init.action_head.name == "action_head--150000_checkpoint.pt"
        model = OpenVLARSD(backbone, VLARSDConfig(use_proprio=True, use_wrist_image=True))
        record = train_vla._init_from_oft(model, init)
    assert _state_dicts_equal(model.proprio_projector.state_dict(), ref.proprio_projector.state_dict())
    assert record["reused"] == ["backbone (vision towers, projector, LLM)", "proprio projector"]
    assert record["fresh"] == ["rsd layer head"] and record["unused"] == ["action_head--150000_checkpoint.pt"]
    assert "L1-regression action head is not used" in caplog.text
    assert "--wrist is off" not in caplog.text
    # RSD's (s - mean) / std reproduces OFT's bounds_q99 normalisation inside the q01..q99 range.
    stats = ref.norm_stats["libero_spatial_no_noops"]["proprio"]
    q01, q99 = np.array(stats["q01"]), np.array(stats["q99"])
    s = q01 + np.random.default_rng(0).uniform(0.05, 0.95, (3, 8)) * (q99 - q01)
    np.testing.assert_allclose(model.normalize_states(s, torch.device("cpu"), torch.float32).numpy(),
                               oft.normalize_proprio(s, stats), atol=1e-5)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rsd.train_vla"):  # --wrist off: advice, the flag is left alone
        no_wrist = train_vla.build_parser().parse_args(argv)
        assert train_vla._oft_init(no_wrist, {}) is not None and not no_wrist.wrist
    assert any(r.levelno == logging.WARNING and "--wrist is off" in r.getMessage() for r in caplog.records)

    # The CLI run: saved as today (released layout + rsd/), moved from the OFT's weights only by training.
    out = tmp_path / "model"
    assert _train_main(tmp_path, demos, out, "--init", str(oft_dir), "--proprio", "--wrist") == 0
    metrics = json.loads((out / RSD_DIR / "train_main_metrics.json").read_text())
    assert metrics["init"]["kind"] == "openvla-oft" and "proprio projector" in metrics["init"]["reused"]
    cfg = json.loads((out / RSD_DIR / RSD_CONFIG).read_text())
    assert cfg["use_proprio"] and cfg["use_wrist_image"]
    np.testing.assert_allclose(cfg["proprio_mean"], (q01 + q99) / 2)
    trained = load_openvla_rsd(out, with_draft=False)
    got, want = trained.backbone.state_dict(), ref.vla.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[k], want[k], atol=1e-3) for k in got)
    assert not _state_dicts_equal(got, want)  # two optimiser steps did move it
    assert torch.allclose(trained.proprio_projector.fc1.weight, ref.proprio_projector.fc1.weight, atol=1e-3)

    assert train_vla.main(["draft", "--model", str(out), "--demos", str(demos), "--steps", "2", "--max-samples", "16",
                           "--heldout-frac", "0.5"]) == 0
    policy = create_policy(ServerConfig(policy="openvla-rsd", model_path=str(out)))
    assert policy.metadata()["inputs"] == ["image", "wrist_image", "state", "instruction"]
    actions = policy.infer([libero_observation(0, size=64, instruction=INSTRUCTIONS[0])])[0].actions
    assert actions.shape == (8, 7) and np.isfinite(actions).all()


def test_main_init_from_an_openvla_rsd_checkpoint_regridded_to_finer_patches(tmp_path: Path) -> None:
    """``main --init <OpenVLA-RSD dir> --patch-size 8``: the vision towers are re-gridded (14x14 patches per camera
    instead of 8x8), the layer head and proprio projector continue from the init, the draft is distilled anew."""
    from rsd import train_vla

    demos = tmp_path / "demos.hdf5"
    _write_demos(demos)
    first = tmp_path / "first"
    assert _train_main(tmp_path, demos, first, "--proprio", "--wrist") == 0
    init = load_openvla_rsd(first, with_draft=False)
    assert init.backbone.num_patches == 64

    # the head's codes mean nothing under another tokenizer; a fresh backbone has no grid to re-cut
    _tokenizer(seed=1).save_pretrained(tmp_path / "other_rfsq")
    with pytest.raises(SystemExit, match="--rfsq"):
        train_vla.main(["main", "--demos", str(demos), "--rfsq", str(tmp_path / "other_rfsq"), "--out",
                        str(tmp_path / "x"), "--init", str(first), "--steps", "1", "--proprio", "--wrist"])
    with pytest.raises(SystemExit, match="--patch-size"):
        _train_main(tmp_path, demos, tmp_path / "y", "--patch-size", "8")

    out = tmp_path / "fine"
    assert _train_main(tmp_path, demos, out, "--init", str(first), "--patch-size", "8", "--proprio", "--wrist") == 0
    metrics = json.loads((out / RSD_DIR / "train_main_metrics.json").read_text())
    assert metrics["init"]["kind"] == "openvla-rsd" and metrics["init"]["patch_size"] == 8
    assert metrics["init"]["reused"] == ["backbone (vision towers, projector, LLM)", "rsd layer head",
                                         "proprio projector"]
    fine = load_openvla_rsd(out, with_draft=False)
    assert fine.backbone.num_patches == 196
    assert [v.patch_size for v in fine.backbone.config.vision_configs()] == [8, 8]
    for name in ("head.weight", "code_embed.weight"):  # two optimiser steps from the init's head, not a fresh one
        a, b = fine.main.state_dict()[name], init.main.state_dict()[name]
        assert torch.allclose(a, b, atol=1e-3) and not torch.equal(a, b)
    assert fine.cfg.proprio_mean == init.cfg.proprio_mean
    llm = "language_model.model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(fine.backbone.state_dict()[llm], init.backbone.state_dict()[llm], atol=1e-3)
    assert train_vla.main(["draft", "--model", str(out), "--demos", str(demos), "--steps", "2", "--max-samples", "16",
                           "--heldout-frac", "0.5"]) == 0
    x = _inputs(seed=3)
    assert _layer0_logits(load_openvla_rsd(out), x).shape == _layer0_logits(init, x).shape
