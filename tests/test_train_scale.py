"""Fine-tuning at scale through the one loop: LoRA (peft), bf16 autocast, gradient accumulation, gradient
checkpointing, 2-process data parallel (gloo; DDP and FSDP) and the memory preflight
(models/common/{training,scale,fsdp,memory}.py).

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


def _fork_ranks(fn, args: tuple, nprocs: int = 2, timeout: float = 300.0) -> None:
    """``fn(rank, *args)`` in ``nprocs`` forked processes; a hang (mismatched collectives) fails instead of
    blocking the suite. Fork, not spawn: the children reuse this process's imports (spawning re-imports torch +
    transformers, minutes on a busy machine); torch runs one thread here, so forking is safe."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn.__name__}: the ranks did not finish in {timeout:.0f} s")


def _fsdp_hooks(model: nn.Module) -> int:
    """Module hooks FSDP registered (forward, state-dict save/load) still on ``model``."""
    kinds = ("_forward_pre_hooks", "_forward_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
             "_load_state_dict_post_hooks")
    return sum("fsdp" in str(getattr(h, "__module__", "")) for m in model.modules() for kind in kinds
               for h in getattr(m, kind).values())


FSDP_CFG = {"steps": 10, "precision": "bf16", "grad_checkpointing": True, "ema_decay": 0.9, "eval_every": 5}


def _shard_fraction(model: nn.Module) -> float:
    """Of the decoder layers' parameters (sharded between their forwards), the share this rank holds."""
    from models.common import fsdp

    dt = [p for u in fsdp.units(model) for p in u.parameters() if fsdp.is_dtensor(p)]
    return sum(p.to_local().numel() for p in dt) / max(1, sum(p.numel() for p in dt))


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    """LoRA r=8 + bf16 frozen weights + gradient checkpointing + EMA + 2 micro-batches under FSDP: stop at step 4,
    resume in a fresh model to step 10, merge, and (rank 0) save the released format."""
    import torch.distributed as dist

    from models.common import fsdp

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        d = Path(out)
        cfg = _cfg(**FSDP_CFG, data_parallel="fsdp", grad_accum=2)
        model = _lora_model(precision="bf16")
        data = _Data(model)
        r1 = fit(model, 8, _cfg(**FSDP_CFG, data_parallel="fsdp", grad_accum=2, stop_at=4),
                 lambda b: data.loss(model, b), checkpoint_dir=d / "ck")
        model = _lora_model(precision="bf16")  # a fresh start, as a new process would build it
        data = _Data(model)
        validated = []

        def validate() -> dict[str, float]:
            with torch.no_grad():
                value = float(data.loss(model, training.make_batch(9, 0, 8, 4)))
            validated.append((value, _shard_fraction(model)))
            return {"heldout": value}

        r2 = fit(model, 8, cfg, lambda b: data.loss(model, b), validate=validate, checkpoint_dir=d / "ck",
                 resume=True)
        plain = (fsdp.is_sharded(model), _fsdp_hooks(model), sum(map(fsdp.is_dtensor, model.parameters())))
        scale.finish_model(model)
        result = {"r1": (r1.step, r1.stopped, r1.losses), "r2": (r2.step, r2.losses, r2.history), "plain": plain,
                  "validated": validated, "state": model.state_dict()}
        if rank == 0:  # alone: a forward must need no other rank now
            result["logits"] = _layer_logits(model, data)
            tiny.save_pretrained(model.backbone, d / "released", num_shards=2)
            model.save_rsd(d / "released")
        torch.save(result, d / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_fsdp_lora_bf16_resumes_and_saves_the_released_format(tmp_path: Path) -> None:
    """FSDP (2 ranks, gloo): the run stopped at step 4 and resumed ends where one unsharded process does; the
    gathered checkpoint is the single-process file; the merged model loads with load_openvla_rsd, unchanged."""
    from client.testing import free_port

    _fork_ranks(_fsdp_worker, (2, free_port(), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = _lora_model(precision="bf16")
    data = _Data(single)
    # grad_accum=4: one process computes the ranks' very micro-batches (the same bf16 matmul shapes)
    ref = fit(single, 8, _cfg(**FSDP_CFG, grad_accum=4), lambda b: data.loss(single, b),
              checkpoint_dir=tmp_path / "single")
    for rk in ranks:
        assert rk["plain"] == (False, 0, 0)  # no DTensor, no FSDP class or hook left on any rank
        assert rk["r1"][:2] == (4, True) and rk["r2"][0] == 10
        assert [s for s, _ in rk["r2"][1]] == list(range(5, 11))  # continued from the saved step
        assert len(rk["validated"]) == 2  # every rank validated, in lockstep
        assert all(0.4 < frac < 0.6 for _, frac in rk["validated"])  # and held half of each decoder layer
    fsdp_losses = [v for _, v in ranks[0]["r1"][2] + ranks[0]["r2"][1]]
    ref_losses = [v for _, v in ref.losses]
    np.testing.assert_allclose(fsdp_losses, ref_losses, rtol=1e-5)
    assert np.mean(fsdp_losses[-3:]) < 0.9 * np.mean(fsdp_losses[:3]), fsdp_losses
    assert ranks[0]["r1"][2] == ranks[1]["r1"][2]  # the loss logged is the mean over ranks
    assert [v for v, _ in ranks[0]["validated"]] == [v for v, _ in ranks[1]["validated"]]
    assert [h["step"] for h in ranks[0]["r2"][2] if "heldout" in h] == [5, 10]
    # the gathered checkpoint is the single-process format: the same keys and raw weights
    from safetensors.torch import load_file

    ck, ck_ref = (load_file(str(tmp_path / n / training.WEIGHTS_FILE)) for n in ("ck", "single"))
    assert ck.keys() == ck_ref.keys()
    for k in ck_ref:
        torch.testing.assert_close(ck[k], ck_ref[k], atol=1e-6, rtol=1e-5, msg=k)
    opt = torch.load(tmp_path / "ck" / training.OPTIMIZER_FILE, weights_only=True)
    opt_ref = torch.load(tmp_path / "single" / training.OPTIMIZER_FILE, weights_only=True)
    assert opt["state"].keys() == opt_ref["state"].keys()
    for i, st in opt_ref["state"].items():
        torch.testing.assert_close(opt["state"][i]["exp_avg_sq"], st["exp_avg_sq"], atol=1e-9, rtol=1e-4)
    # the released format: what rank 0 saved loads with the server's loader and equals the trained weights
    trained = ranks[0]["state"]
    scale.finish_model(single)  # the EMA weights, merged: what the unsharded run would release
    for k, v in single.state_dict().items():
        torch.testing.assert_close(trained[k], v, atol=1e-6, rtol=1e-5, msg=k)
    assert not [k for k in trained if "lora" in k] and {v.dtype for v in trained.values()} <= {torch.float32,
                                                                                               torch.int64}
    loaded = load_openvla_rsd(tmp_path / "released")
    sd = loaded.state_dict()
    common = [k for k in sd if k in trained]
    assert len(common) > 0.9 * len(trained)
    for k in common:
        assert torch.equal(sd[k], trained[k]), k
    torch.testing.assert_close(_layer_logits(loaded, data), ranks[0]["logits"], atol=1e-5, rtol=1e-5)
    for k, v in trained.items():  # every rank ends with the same whole model, as after DDP
        assert torch.equal(ranks[1]["state"][k], v), k


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


def test_memory_estimate_under_fsdp_shards_the_state_and_adds_the_gathered_layers() -> None:
    from models.common import fsdp

    model = _lora_model(precision="bf16")
    sizes = {"batch": 4, "seq": 300, "hidden": 128, "layers": 2, "intermediate": 256, "checkpointing": False,
             "precision": "bf16", "lora_r": 8}
    one, two = memory.estimate_from_model(model, **sizes), memory.estimate_from_model(model, shards=2, **sizes)
    # weights (frozen, trainable), gradients, AdamW moments: half each on each of 2 ranks
    for (_, whole), (name, half) in zip(one.rows[:4], two.rows[:4], strict=True):
        assert half == pytest.approx(whole / 2) and name.endswith("1/2 shard")
    root, per_layer = fsdp.group_sizes(model)
    assert len(per_layer) == 2 and root + sum(per_layer) == sum(p.numel() for p in model.parameters())
    gathered = dict(two.rows)["FSDP all-gathered (root group + 2 layers, weights + grads)"]
    assert (root + 2 * max(per_layer)) * 2 <= gathered <= (root + 2 * max(per_layer)) * 8  # bf16 .. fp32+grad
    assert [b for n, b in one.rows if n.startswith("activations")] == [b for n, b in two.rows
                                                                       if n.startswith("activations")]
    # 7B full fine-tune, bf16, batch 16 a GPU: 159 GB unsharded; FSDP over 8 GPUs fits 80 GB, 16 bytes a
    # parameter of state become 2
    full = memory.openvla_rsd_7b_estimate(lora_r=0, precision="bf16")
    fsdp8 = memory.openvla_rsd_7b_estimate(lora_r=0, precision="bf16", shards=8)
    fsdp8_ckpt = memory.openvla_rsd_7b_estimate(lora_r=0, precision="bf16", shards=8, checkpointing=True)
    assert fsdp8_ckpt.total < fsdp8.total < 80e9 < full.total
    assert sum(b for _, b in fsdp8.rows[:4]) == pytest.approx(sum(b for _, b in full.rows[:4]) / 8)
    for est in (full, fsdp8, fsdp8_ckpt):  # the table in the module docstring is these numbers
        assert f"{est.total / 1e9:.1f} GB" in memory.__doc__
    with pytest.raises(SystemExit, match="--data-parallel fsdp"):
        memory.check_fits(full, "cuda:0", available=80e9)
    # the loaded model's own weights are added back to the free memory (the estimate counts them already)
    own = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert own <= memory.resident_bytes(model, "cpu") <= 1.1 * own and memory.resident_bytes(model, "meta") == 0


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


def _trainer_worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    """One torchrun rank: the environment torchrun sets, then the trainer's own entry point."""
    import torch.distributed as dist

    from rsd import train_vla

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    try:
        assert train_vla.main(argv) == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_trainer_data_parallel_fsdp_end_to_end(tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m rsd.train_vla main --data-parallel fsdp --lora-r 4 --precision bf16``
    (two forked ranks on gloo): validation during training, then rank 0 writes a plain released-format directory."""
    from test_rsd_vla import _write_demos

    from client.testing import free_port

    demos = tmp_path / "demos.hdf5"
    _write_demos(demos)
    _tokenizer().save_pretrained(tmp_path / "rfsq")
    out = tmp_path / "model"
    argv = ["main", "--demos", str(demos), "--rfsq", str(tmp_path / "rfsq"), "--out", str(out), "--steps", "2",
            "--batch-size", "4", "--save-every", "2", "--eval-every", "1", "--heldout-frac", "0.5", "--threads", "1",
            "--lora-r", "4", "--precision", "bf16", "--data-parallel", "fsdp"]
    _fork_ranks(_trainer_worker, (2, free_port(), argv))
    from safetensors.torch import load_file

    keys = [k for f in out.glob("model-*.safetensors") for k in load_file(str(f))]
    assert keys and not [k for k in keys if "lora" in k or "base_layer" in k]
    assert not scale.has_lora(load_openvla_rsd(out))
    assert (out / "train_state" / training.WEIGHTS_FILE).is_file()
