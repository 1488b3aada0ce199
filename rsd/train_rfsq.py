"""Trains the RFSQ action tokenizer on LIBERO-layout HDF5 demonstrations (CPU-capable, seeded, resumable).

    python -m rsd.train_rfsq --data 'artifacts/demos/libero_spatial/*.hdf5' --mode robust --steps 3000 \
        --seed 0 --out artifacts/rfsq/robust [--resume]

Pipeline: read ``data/demo_*/actions`` → split train/held-out by demonstration → fit q01/q99 normalisation on the
training actions → stride-1 chunks of 8 (end padded) → train the autoencoder with the STE. Robust mode keeps
running residual statistics for the first ``--freeze-frac`` of the steps, then recalibrates them on training
latents, freezes them, and trains the rest against the frozen constants (decoding must work from tokens alone).

Loss = MSE(full reconstruction) + ``--coarse-weight`` · mean over k<L of MSE(decode of the first k layers):
the second term trains the decoder to make sense of coarse prefixes (the policy may stop early, and the
benchmark asks every layer to lower the error); its gradient is kept off the encoder.

The loop is :func:`models.common.training.fit`: batches are a pure function of (seed, step), so ``--resume``
from ``<out>/checkpoint`` continues exactly (model.safetensors + optimizer.pt + state.json, which also carries
the run's config and the normalisation fitted at the start); the final tokenizer is written with
``save_pretrained`` into ``<out>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from client.dataset import chunk_demos, load_demos, split_demos
from models.common import training
from rsd.normalization import ActionNormalizer
from rsd.rfsq import MODES, RFSQAutoencoder, RFSQConfig, RFSQTokenizer

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainConfig:
    """Everything a training run depends on (written to ``<out>/train_config.json``)."""

    data: str = ""
    out: str | None = None
    mode: str = "robust"
    steps: int = 3000
    seed: int = 0
    batch_size: int = 256
    lr: float = 5e-3
    min_lr_frac: float = 0.02
    warmup_steps: int = 100
    weight_decay: float = 0.0
    freeze_frac: float = 0.8
    coarse_weight: float = 1.0
    heldout_frac: float = 0.1
    checkpoint_every: int = 500
    resume: bool = False
    stop_at: int | None = None
    polish: bool = True
    threads: int = 0
    progress: bool = True
    model: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Fails at start-up with a message naming the flag."""
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}; got {self.mode!r}")
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1; got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1; got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0; got {self.lr}")
        if not 0.0 <= self.freeze_frac <= 1.0:
            raise ValueError(f"--freeze-frac must be in [0, 1]; got {self.freeze_frac}")
        if self.coarse_weight < 0:
            raise ValueError(f"--coarse-weight must be >= 0; got {self.coarse_weight}")
        if not 0.0 <= self.heldout_frac < 1.0:
            raise ValueError(f"--heldout-frac must be in [0, 1); got {self.heldout_frac}")
        if self.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be >= 1; got {self.checkpoint_every}")
        if self.stop_at is not None and not 0 < self.stop_at <= self.steps:
            raise ValueError(f"--stop-at must be in 1..--steps; got {self.stop_at}")
        if self.resume and not self.out:
            raise ValueError("--resume needs --out")
        RFSQConfig(mode=self.mode, **self.model)  # validates the model fields too

    def model_config(self) -> RFSQConfig:
        """The tokenizer configuration this run trains."""
        return RFSQConfig(mode=self.mode, **self.model)


@dataclass
class Dataset:
    """Raw (unnormalised) chunks for training and held-out evaluation, plus where they came from."""

    train_chunks: np.ndarray  # [N, H, A]
    heldout_chunks: np.ndarray  # [M, H, A] (may be empty)
    train_actions: np.ndarray  # [T, A] the training demonstrations' actions (for normalisation statistics)
    info: dict[str, Any]


def prepare_dataset(data: str, chunk_len: int = 8, heldout_frac: float = 0.1, seed: int = 0) -> Dataset:
    """Loads demonstrations matching ``data`` and splits them by demonstration."""
    demos = load_demos(data)
    train, held = split_demos(demos, heldout_frac, seed)
    train_chunks = chunk_demos(train, chunk_len)
    held_chunks = chunk_demos(held, chunk_len) if held else np.zeros((0,) + train_chunks.shape[1:], np.float32)
    info = {
        "data": data,
        "files": sorted({d.source for d in demos}),
        "num_demos": len(demos),
        "num_train_demos": len(train),
        "num_heldout_demos": len(held),
        "num_train_chunks": int(train_chunks.shape[0]),
        "num_heldout_chunks": int(held_chunks.shape[0]),
    }
    return Dataset(train_chunks, held_chunks, np.concatenate([d.actions for d in train]), info)


def loss_fn(model: RFSQAutoencoder, x: torch.Tensor, coarse_weight: float,
            train_encoder: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """Full-reconstruction MSE (STE gradient to the encoder) + weighted coarse-prefix MSE (decoder only)."""
    z = model.encode_latent(x)
    if not train_encoder:
        z = z.detach()
    z_q, _, partial = model.quantize(z, update_stats=model.training)
    out = {"recon": model.decode_latent(z_q), "partial": partial}
    full = F.mse_loss(out["recon"], x)
    loss = full
    stats = {"mse": float(full.detach())}
    if coarse_weight > 0 and model.config.num_layers > 1:
        # Each prefix depth k goes through its own head; the latents are detached (decoder-only gradient).
        coarse = torch.stack([F.mse_loss(model.decode_latent(zk, k), x)
                              for k, zk in enumerate(out["partial"][:-1], start=1)]).mean()
        loss = loss + coarse_weight * coarse
        stats["coarse_mse"] = float(coarse.detach())
    return loss, stats


@torch.no_grad()
def _calibrate(model: RFSQAutoencoder, x_train: torch.Tensor, max_samples: int = 262144) -> None:
    """Recalibrates and freezes the robust constants on the training chunks (a seeded subset past
    ``max_samples``; all of them normally, since one layer's range must cover the largest latent seen)."""
    was_training = model.training
    model.eval()
    n = x_train.shape[0]
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(1234))[:max_samples]
    model.calibrate(model.encode_latent(x_train[idx]), freeze=True)
    model.train(was_training)
    logger.info("robust constants frozen; scales per layer: %s", [f"{v:.2e}" for v in model.layer_scale.mean((1, 2)).tolist()])


def train_rfsq(cfg: TrainConfig, dataset: Dataset | None = None) -> tuple[RFSQTokenizer, dict[str, Any]]:
    """Trains a tokenizer; returns it and a summary (held-out MSE, timings, history).

    ``dataset`` lets a caller (benchmark, tests) train several models on exactly the same chunks.
    """
    cfg.validate()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    mcfg = cfg.model_config()
    if dataset is None:
        dataset = prepare_dataset(cfg.data, mcfg.chunk_len, cfg.heldout_frac, cfg.seed)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out) if cfg.out else None
    ckpt = out / CHECKPOINT_DIR if out else None

    model = RFSQAutoencoder(mcfg)
    normalizer = ActionNormalizer.fit(dataset.train_actions)
    state = training.read_checkpoint_state(ckpt) if cfg.resume and ckpt is not None else None
    if state is not None:
        saved = state["meta"]["train_config"]
        if saved["mode"] != cfg.mode or saved.get("model", {}) != cfg.model:
            raise ValueError(f"--resume: checkpoint in {ckpt} was trained with a different mode/model config")
        normalizer = ActionNormalizer.from_dict(state["meta"]["normalizer"])

    x_train = torch.from_numpy(normalizer.normalize(dataset.train_chunks))
    # Same schedule for both modes (a fair comparison): at freeze_step the robust constants are recalibrated and
    # frozen, and from then on only the decoder trains, so the constants stay exact for the encoder's latents.
    freeze_step = int(round(cfg.freeze_frac * cfg.steps))

    def batch_loss(batch: training.Batch) -> tuple[torch.Tensor, dict[str, float]]:
        if batch.step >= freeze_step and mcfg.mode == "robust" and not bool(model.stats_frozen):
            _calibrate(model, x_train)
        return loss_fn(model, x_train[torch.from_numpy(batch.index)], cfg.coarse_weight, batch.step < freeze_step)

    tcfg = training.TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
        min_lr_frac=cfg.min_lr_frac, weight_decay=cfg.weight_decay, seed=cfg.seed,
        save_every=cfg.checkpoint_every, log_every=50, stop_at=cfg.stop_at, progress=cfg.progress,
        desc=f"rfsq-{mcfg.mode}")
    t0 = time.perf_counter()
    result = training.fit(model, x_train.shape[0], tcfg, batch_loss, checkpoint_dir=ckpt, resume=cfg.resume,
                          meta={"train_config": asdict(cfg), "normalizer": normalizer.to_dict()})
    history = result.history
    if result.stopped:
        # Time-boxed run (or a test of --resume): checkpointed as if interrupted here.
        return RFSQTokenizer(model.eval(), normalizer), {"mode": mcfg.mode, "stopped_at": result.step, **dataset.info}
    if mcfg.mode == "robust" and not bool(model.stats_frozen):
        _calibrate(model, x_train)  # freeze_frac == 1.0 or resumed past the freeze point without it
    if cfg.polish:
        polish_mse = model.polish_decoder(x_train)
        logger.info("decoder heads refit by least squares: train MSE per depth %s",
                    " ".join(f"{m:.2e}" for m in polish_mse))
    train_s = time.perf_counter() - t0
    model.eval()
    tok = RFSQTokenizer(model, normalizer)
    summary: dict[str, Any] = {"mode": mcfg.mode, "steps": cfg.steps, "train_seconds": train_s, **dataset.info}
    if dataset.heldout_chunks.shape[0]:
        x_held = torch.from_numpy(normalizer.normalize(dataset.heldout_chunks))
        tokens = model.encode(x_held)
        summary["heldout_mse"] = float(F.mse_loss(model.decode(tokens), x_held))
    if out is not None:
        tok.save_pretrained(out)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        (out / "metrics.json").write_text(json.dumps({**summary, "history": history}, indent=2))
    logger.info("trained %s RFSQ in %.1fs: %s", mcfg.mode, train_s,
                {k: v for k, v in summary.items() if k.endswith("mse")})
    return tok, summary


def build_arg_parser() -> argparse.ArgumentParser:
    """CLI flags (each maps to one TrainConfig field)."""
    p = argparse.ArgumentParser(description="Train the RFSQ action tokenizer on LIBERO-layout HDF5 demonstrations")
    p.add_argument("--data", required=True, help="glob of HDF5 files (data/demo_*/actions)")
    p.add_argument("--mode", choices=MODES, default="robust")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (tokenizer + checkpoint/)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint if present")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--freeze-frac", type=float, default=0.8,
                   help="fraction of steps after which the robust constants freeze and only the decoder trains")
    p.add_argument("--coarse-weight", type=float, default=1.0, help="weight of the coarse-prefix reconstruction loss")
    p.add_argument("--heldout-frac", type=float, default=0.1)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--stop-at", type=int, default=None, help="checkpoint and stop at this step (time-boxed run)")
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--num-hidden", type=int, default=2)
    p.add_argument("--robust-range", type=float, default=3.0, help="κ in s_l = κ·std(residual_l)")
    p.add_argument("--robust-range0", type=float, default=2.2,
                   help="κ for layer 0 (0: cover the largest calibration deviation)")
    p.add_argument("--encoder-hidden", type=int, default=0,
                   help="encoder hidden layers (0: affine encoder, exactly invertible by the decoder)")
    p.add_argument("--no-polish", action="store_true", help="skip the least-squares refit of the decoder heads")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Fills a TrainConfig from parsed flags and validates it."""
    cfg = TrainConfig(
        data=args.data, out=args.out, mode=args.mode, steps=args.steps, seed=args.seed,
        batch_size=args.batch_size, lr=args.lr, freeze_frac=args.freeze_frac, coarse_weight=args.coarse_weight,
        heldout_frac=args.heldout_frac, checkpoint_every=args.checkpoint_every, resume=args.resume,
        stop_at=args.stop_at,
        threads=args.threads, progress=not args.no_progress,
        polish=not args.no_polish,
        model={"hidden_dim": args.hidden_dim, "num_hidden": args.num_hidden, "robust_range": args.robust_range,
               "robust_range0": args.robust_range0, "encoder_hidden": args.encoder_hidden},
    )
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: prints the summary JSON as its last line."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _, summary = train_rfsq(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "files"}))


if __name__ == "__main__":
    main()
