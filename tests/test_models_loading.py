"""Loader behaviour: round trips through the public loader, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from models import CheckpointError, build_for_scan, load_pretrained
from models.common.loading import checkpoint_state_dict
from models.common.safetensors_io import INDEX_NAME, save_sharded
from models.gr00t import tiny as gr00t_tiny
from models.openvla import tiny as openvla_tiny


@pytest.fixture(scope="module")
def openvla_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    model = openvla_tiny.build_tiny("tiny", seed=0)
    out = tmp_path_factory.mktemp("openvla") / "ckpt"
    openvla_tiny.save_pretrained(model, out, num_shards=3)
    return out, model


@pytest.fixture(scope="module")
def gr00t_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    model = gr00t_tiny.build_tiny(seed=0)
    out = tmp_path_factory.mktemp("gr00t") / "ckpt"
    gr00t_tiny.save_pretrained(model, out, num_shards=2)
    return out, model


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_openvla_roundtrip_identical(openvla_dir: tuple[Path, object]) -> None:
    path, ref = openvla_dir
    assert len(list(path.glob("model-*-of-00003.safetensors"))) == 3
    loaded = load_pretrained("openvla", path)
    ref_sd, got_sd = ref.state_dict(), loaded.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    assert all(torch.equal(ref_sd[k], got_sd[k]) for k in ref_sd)
    rng = np.random.RandomState(0)
    imgs = [rng.randint(0, 255, (120, 130, 3), dtype=np.uint8) for _ in range(2)]
    instr = ["put the black bowl on the plate", "open the top drawer of the cabinet"]
    batch = loaded.processor(imgs, instr)
    with torch.no_grad():
        a = loaded(**batch)["logits"]
        b = ref(**ref.processor(imgs, instr))["logits"]
    assert torch.equal(a, b)
    np.testing.assert_array_equal(loaded.predict_action(imgs, instr), ref.predict_action(imgs, instr))


def test_gr00t_roundtrip_identical(gr00t_dir: tuple[Path, object]) -> None:
    path, ref = gr00t_dir
    loaded = load_pretrained("gr00t", path)
    ref_sd, got_sd = ref.state_dict(), loaded.state_dict()
    assert all(torch.equal(ref_sd[k], got_sd[k]) for k in ref_sd)
    lm = loaded.backbone.eagle_model.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # re-tied after assignment
    rng = np.random.RandomState(1)
    obs = loaded.data_config.from_libero(
        rng.randint(0, 255, (2, 96, 96, 3), dtype=np.uint8), rng.randint(0, 255, (2, 96, 96, 3), dtype=np.uint8),
        rng.randn(2, 8) * 0.1, ["pick up the cup", "put the bowl on the plate"])
    a = loaded.get_action(obs, generator=torch.Generator().manual_seed(3))
    b = ref.get_action(obs, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 16, 7)
    assert torch.equal(a, b)


def test_checkpoint_uses_released_vision_names(gr00t_dir: tuple[Path, object]) -> None:
    path, _ = gr00t_dir
    keys = json.loads((path / INDEX_NAME).read_text())["weight_map"]
    assert any(k.startswith("backbone.eagle_model.vision_model.vision_model.encoder.layers.0.") for k in keys)
    assert "backbone.eagle_model.language_model.lm_head.weight" not in keys
    assert (path / "experiment_cfg" / "metadata.json").is_file()


def test_gr00t_accepts_lm_head_instead_of_embed_tokens(gr00t_dir: tuple[Path, object], tmp_path: Path) -> None:
    path, ref = gr00t_dir
    dst = _copy(path, tmp_path)
    for f in dst.glob("model*.safetensors*"):
        f.unlink()
    sd = checkpoint_state_dict(ref)
    emb = "backbone.eagle_model.language_model.model.embed_tokens.weight"
    sd = {("backbone.eagle_model.language_model.lm_head.weight" if k == emb else k): v for k, v in sd.items()}
    save_sharded(sd, dst, num_shards=2)
    loaded = load_pretrained("gr00t", dst)
    assert torch.equal(loaded.backbone.eagle_model.language_model.model.embed_tokens.weight, ref_emb(ref))


def ref_emb(model: object) -> torch.Tensor:
    return model.backbone.eagle_model.language_model.model.embed_tokens.weight  # type: ignore[attr-defined]


def test_bf16_load_casts(openvla_dir: tuple[Path, object]) -> None:
    path, ref = openvla_dir
    m = load_pretrained("openvla", path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    w = m.language_model.lm_head.weight
    assert torch.equal(w, ref.language_model.lm_head.weight.to(torch.bfloat16))


def test_missing_shard(openvla_dir: tuple[Path, object], tmp_path: Path) -> None:
    dst = _copy(openvla_dir[0], tmp_path)
    (dst / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        load_pretrained("openvla", dst)


def test_truncated_shard(openvla_dir: tuple[Path, object], tmp_path: Path) -> None:
    dst = _copy(openvla_dir[0], tmp_path)
    f = dst / "model-00003-of-00003.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="model-00003-of-00003"):
        load_pretrained("openvla", dst)


def test_garbled_header(openvla_dir: tuple[Path, object], tmp_path: Path) -> None:
    dst = _copy(openvla_dir[0], tmp_path)
    f = dst / "model-00001-of-00003.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"#" * 32
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model-00001-of-00003"):
        load_pretrained("openvla", dst)


def _rewrite(src: Path, tmp_path: Path, ref: object, edit) -> Path:  # noqa: ANN001
    dst = _copy(src, tmp_path)
    for f in dst.glob("model*.safetensors*"):
        f.unlink()
    sd = dict(checkpoint_state_dict(ref))
    edit(sd)
    save_sharded(sd, dst, num_shards=2)
    return dst


def test_missing_key_named(openvla_dir: tuple[Path, object], tmp_path: Path) -> None:
    path, ref = openvla_dir
    dst = _rewrite(path, tmp_path, ref, lambda sd: sd.pop("projector.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"missing.*projector\.fc2\.bias"):
        load_pretrained("openvla", dst)


def test_unexpected_key_named(openvla_dir: tuple[Path, object], tmp_path: Path) -> None:
    path, ref = openvla_dir
    dst = _rewrite(path, tmp_path, ref, lambda sd: sd.__setitem__("projector.fc9.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected.*projector\.fc9\.weight"):
        load_pretrained("openvla", dst)


def test_shape_mismatch_named(openvla_dir: tuple[Path, object], tmp_path: Path) -> None:
    path, ref = openvla_dir
    dst = _rewrite(path, tmp_path, ref, lambda sd: sd.__setitem__("projector.fc1.bias", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*projector\.fc1\.bias"):
        load_pretrained("openvla", dst)


def test_wrong_dtype(openvla_dir: tuple[Path, object], tmp_path: Path) -> None:
    path, ref = openvla_dir
    dst = _rewrite(path, tmp_path, ref,
                   lambda sd: sd.__setitem__("projector.fc1.bias", torch.zeros_like(sd["projector.fc1.bias"], dtype=torch.int32)))
    with pytest.raises(CheckpointError, match=r"projector\.fc1\.bias.*dtype"):
        load_pretrained("openvla", dst)
    with pytest.raises(CheckpointError, match="dtype"):
        load_pretrained("openvla", path, dtype=torch.int8)


def test_unknown_model_type_and_architecture(openvla_dir: tuple[Path, object], tmp_path: Path) -> None:
    dst = _copy(openvla_dir[0], tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "model_type": "mystery"}))
    with pytest.raises(CheckpointError, match="model_type 'mystery'"):
        load_pretrained("openvla", dst)
    (dst / "config.json").write_text(json.dumps({**cfg, "architectures": ["SomethingElse"]}))
    with pytest.raises(CheckpointError, match="architectures"):
        load_pretrained("openvla", dst)
    with pytest.raises(CheckpointError, match="model_type"):
        load_pretrained("gr00t", openvla_dir[0])  # an OpenVLA dir is not a GR00T checkpoint
    with pytest.raises(CheckpointError, match="unknown policy"):
        load_pretrained("pi0", dst)
    with pytest.raises(CheckpointError, match="missing|not found"):
        load_pretrained("openvla", tmp_path / "nope")


def test_build_for_scan_is_meta(openvla_dir: tuple[Path, object], gr00t_dir: tuple[Path, object]) -> None:
    for policy, path in (("openvla", openvla_dir[0]), ("openvla-rsd", openvla_dir[0]), ("gr00t", gr00t_dir[0])):
        m = build_for_scan(policy, path)
        assert all(p.device.type == "meta" for p in m.parameters())
    assert models.POLICIES == ("openvla", "openvla-rsd", "openvla-oft", "gr00t")
