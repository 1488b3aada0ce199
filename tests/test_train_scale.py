"""Fine-tuning at scale through the one loop: LoRA (peft), bf16 autocast, gradient accumulation, gradient
checkpointing, 2-process data parallel (gloo) and the memory preflight (models/common/{training,scale,memory}.py).

Tiny random models on the CPU; a 7B run is only estimated here (benchmarks/bench_gpu.py measures one on a GPU).
"""

from __future__ import annotations

import os
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.common import memory, scale, training
from models.common.training import Batch, TrainConfig, fit
from models.openvla import tiny
from rsd.normalization import ActionNormalizer
from rsd.rfsq import RFSQAutoencoder, RFSQConfig, RFSQTokenizer
from rsd.vla import OpenVLARSD, VLARSDConfig, load_openvla_rsd

pytest.importorskip("peft")
torch.set_num_threads(1)
INSTRUCTIONS = ["pick up the black bowl and place it on the plate", "put the bowl on the cookie box"]
HEAD = ("main.code_embed.", "main.layer_embed.", "main.head.")


def _tokenizer() -> RFSQTokenizer:
    torch.manual_seed(0)
    model = RFSQAutoencoder(RFSQConfig(hidden_dim=32))
    with torch.no_grad():
        model.calibrate(model.encode_latent(torch.rand(256, 8, 7) * 2 - 1))
    return RFSQTokenizer(model, ActionNormalizer(q01=-np.ones(7), q99=np.ones(7)))


def _args(**kw) -> Namespace:
    base = {"lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "lora_targets": ",".join(scale.LORA_DEFAULT_TARGETS),
            "precision": "fp32", "grad_accum": 1, "grad_checkpointing": False}
    return Namespace(**(base | kw))


def _lora_model(**kw) -> OpenVLARSD:
    torch.manual_seed(0)
    model = OpenVLARSD(tiny.build_tiny("tiny", seed=0), VLARSDConfig())
    model.tokenizer = _tokenizer()
    scale.prepare_model(model, model.backbone.language_model, _args(**kw),
                        keep_trainable=[model.main.code_embed, model.main.layer_embed, model.main.head])
    return model


class _Data:
    """8 fixed samples: images, instructions and target RFSQ layers (a memorisation task)."""

    def __init__(self, model: OpenVLARSD, n: int = 8) -> None:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 255, (n, 112, 112, 3), dtype=np.uint8)
        self.pv = model.processor.preprocess_images(images, False)
        self.instr = [INSTRUCTIONS[i % 2] for i in range(n)]
        g = torch.Generator().manual_seed(0)
        self.layers = torch.randint(0, 7, (n, 8, 128), generator=g)

    def loss(self, model: OpenVLARSD, batch: Batch) -> torch.Tensor:
        j = batch.index
        loss, _ = model.training_loss(self.pv[j], [self.instr[k] for k in j], self.layers[j])
        return loss


def _cfg(**kw) -> TrainConfig:
    base = {"steps": 20, "batch_size": 4, "lr": 5e-3, "warmup_steps": 2, "grad_clip": 1.0, "seed": 3,
            "progress": False, "log_every": 100}
    return TrainConfig(**(base | kw))


@torch.no_grad()
def _layer_logits(model: OpenVLARSD, data: _Data) -> torch.Tensor:
    model.eval()
    return model.training_loss(data.pv[:2], data.instr[:2], data.layers[:2])[1]


def test_lora_loss_falls_only_adapters_and_head_train_and_merged_save_loads(tmp_path: Path) -> None:
    model = _lora_model()
    data = _Data(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or n.startswith(HEAD) for n in names)
    assert any("lora_" in n for n in names) and any(n.startswith(HEAD) for n in names)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    # one backward: gradients reach exactly the trainable set
    model.train()
    data.loss(model, training.make_batch(0, 0, 8, 4)).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == names
    model.zero_grad(set_to_none=True)

    result = fit(model, 8, _cfg(), lambda b: data.loss(model, b))
    losses = [v for _, v in result.losses]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses
    for n, p in model.named_parameters():  # the base weights did not move
        if n in frozen:
            assert torch.equal(p, frozen[n]), n

    before = _layer_logits(model, data)
    assert scale.merge_lora(model) > 0 and not scale.has_lora(model)
    assert not [k for k in model.state_dict() if "lora" in k]
    torch.testing.assert_close(_layer_logits(model, data), before, atol=1e-4, rtol=1e-4)
    tiny.save_pretrained(model.backbone, tmp_path / "m", num_shards=2)
    model.save_rsd(tmp_path / "m")
    loaded = load_openvla_rsd(tmp_path / "m")
    assert not [k for k in loaded.state_dict() if "lora" in k]
    torch.testing.assert_close(_layer_logits(loaded, data), before, atol=1e-4, rtol=1e-4)


def test_lora_resume_is_exact(tmp_path: Path) -> None:
    full = _lora_model()
    data = _Data(full)
    fit(full, 8, _cfg(steps=6), lambda b: data.loss(full, b), checkpoint_dir=tmp_path / "full")
    split = _lora_model()
    r1 = fit(split, 8, _cfg(steps=6, stop_at=3), lambda b: data.loss(split, b), checkpoint_dir=tmp_path / "ck")
    assert r1.stopped and r1.step == 3
    resumed = _lora_model()  # a fresh process: same construction (LoRA injected), then the checkpoint
    r2 = fit(resumed, 8, _cfg(steps=6), lambda b: data.loss(resumed, b), checkpoint_dir=tmp_path / "ck", resume=True)
    assert r2.step == 6
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_bf16_autocast_on_cpu_with_bf16_frozen_weights() -> None:
    model = _lora_model(precision="bf16")
    data = _Data(model)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # fp32 master weights
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    result = fit(model, 8, _cfg(steps=4, precision="bf16"), lambda b: data.loss(model, b))
    assert all(np.isfinite(v) for _, v in result.losses)
    scale.finish_model(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32} and not scale.has_lora(model)


def test_gradient_checkpointing_enables_the_llm_and_keeps_gradients() -> None:
    grads = []
    for ckpt in (False, True):
        model = _lora_model()
        data = _Data(model)
        if ckpt:
            assert scale.enable_gradient_checkpointing(model) == ["backbone.language_model"]
        model.train()
        data.loss(model, training.make_batch(0, 0, 8, 4)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


class Toy(nn.Module):
    """Deterministic regression (no noise): the batch split cannot change the mean gradient."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True)

    def loss(self, batch: Batch) -> torch.Tensor:
        idx = torch.from_numpy(batch.index)
        return ((self.net(self.x[idx]) - self.y[idx]) ** 2).mean()


def _toy_cfg(**kw) -> TrainConfig:
    base = {"steps": 10, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2, "grad_clip": 1.0, "seed": 5,
            "progress": False}
    return TrainConfig(**(base | kw))


def test_grad_accum_equals_the_whole_batch_in_one_pass() -> None:
    """``grad_accum=2`` of 2 micro-batches of b = 4 ends where one pass over the step's 2b = 8 samples does."""
    one, two = Toy(), Toy()
    fit(one, 64, _toy_cfg())
    r = fit(two, 64, _toy_cfg(grad_accum=2))
    assert len(r.losses) == 10
    for (k, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)
    # the micro-batches are the step's batch, split: a pure function of (seed, step, micro)
    whole = training.make_batch(5, 3, 64, 8)
    parts = [training.make_batch(5, 3, 64, 8, m, 2) for m in range(2)]
    assert np.array_equal(np.concatenate([p.index for p in parts]), whole.index)
    assert np.array_equal(training.make_batch(5, 3, 64, 8, 1, 2).index, parts[1].index)
    with pytest.raises(ValueError, match="divisible"):
        fit(Toy(), 64, _toy_cfg(batch_size=7, grad_accum=2))


def _ddp_worker(rank: int, world: int, port: int, out: str, stop_at: int | None, resume: bool) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = Toy()
        if rank == 1:  # a different init on rank 1: the loop must start every rank from rank 0's weights
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        r = fit(model, 64, _toy_cfg(stop_at=stop_at), checkpoint_dir=Path(out) / "ck", resume=resume)
        torch.save({"state": model.state_dict(), "losses": r.losses, "step": r.step},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(out: Path, stop_at: int | None = None, resume: bool = False) -> list[dict]:
    import torch.multiprocessing as mp

    from client.testing import free_port

    mp.spawn(_ddp_worker, args=(2, free_port(), str(out), stop_at, resume), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_process_data_parallel_equals_one_process_and_resumes(tmp_path: Path) -> None:
    single = Toy()
    fit(single, 64, _toy_cfg())
    ranks = _spawn(tmp_path / "ddp")
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][k], v, atol=1e-6, rtol=1e-5, msg=k)
        assert torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]), k
    losses = [v for _, v in ranks[0]["losses"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) and ranks[0]["losses"] == ranks[1]["losses"]  # the loss logged is the mean
    from safetensors.torch import load_file

    ck = load_file(str(tmp_path / "ddp" / "ck" / training.WEIGHTS_FILE))  # rank 0's checkpoint
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ck[k], v, atol=1e-6, rtol=1e-5, msg=k)
    # stop at step 4, then resume in new processes: ends where the uninterrupted run did
    first = _spawn(tmp_path / "split", stop_at=4)
    assert first[0]["step"] == 4
    again = _spawn(tmp_path / "split", resume=True)
    assert again[0]["step"] == 10
    for k, v in ranks[0]["state"].items():
        torch.testing.assert_close(again[0]["state"][k], v, atol=1e-6, rtol=1e-5, msg=k)


def test_memory_estimate_refuses_an_impossible_run_with_the_numbers() -> None:
    model = _lora_model()
    with pytest.raises(SystemExit) as exc:
        memory.preflight(model, "cpu", log=lambda s: None, available=1e6, batch=4, seq=300, hidden=128, layers=2,
                         intermediate=256, checkpointing=False, precision="fp32", lora_r=8)
    msg = str(exc.value)
    assert "refusing to start" in msg and "0.00 GB available" in msg and "AdamW moments" in msg
    est = memory.preflight(model, "cpu", log=lambda s: None, available=1e12, batch=4, seq=300, hidden=128,
                           layers=2, intermediate=256, checkpointing=False, precision="fp32", lora_r=8)
    assert 0 < est.total < 1e12
    # the 7B figures: LoRA r=32 bf16 batch 16 fits one 80 GB GPU; full fp32 AdamW does not
    lora7b = memory.openvla_rsd_7b_estimate(batch=16, lora_r=32)
    assert 30e9 < lora7b.total < 80e9
    assert memory.openvla_rsd_7b_estimate(batch=16, lora_r=32, checkpointing=True).total < lora7b.total
    assert memory.openvla_rsd_7b_estimate(lora_r=0, precision="fp32").total > 112e9
    with pytest.raises(SystemExit, match="GB"):
        memory.check_fits(memory.openvla_rsd_7b_estimate(lora_r=0, precision="fp32"), "cuda:0", available=80e9)


def test_trainer_flags_lora_bf16_accum_end_to_end(tmp_path: Path) -> None:
    """``rsd.train_vla main --lora-r 4 --precision bf16 --grad-accum 2 --grad-checkpointing``: the saved model is
    a plain released-format directory (no lora keys) that loads with load_openvla_rsd."""
    from test_rsd_vla import _write_demos

    from rsd import train_vla

    demos = tmp_path / "demos.hdf5"
    _write_demos(demos)
    _tokenizer().save_pretrained(tmp_path / "rfsq")
    out = tmp_path / "model"
    assert train_vla.main(["main", "--demos", str(demos), "--rfsq", str(tmp_path / "rfsq"), "--out", str(out),
                           "--steps", "2", "--batch-size", "4", "--save-every", "2", "--heldout-frac", "0.5",
                           "--lora-r", "4", "--precision", "bf16", "--grad-accum", "2",
                           "--grad-checkpointing"]) == 0
    from safetensors.torch import load_file

    keys = [k for f in out.glob("model-*.safetensors") for k in load_file(str(f))]
    assert keys and not [k for k in keys if "lora" in k or "base_layer" in k]
    model = load_openvla_rsd(out)
    assert not scale.has_lora(model)
