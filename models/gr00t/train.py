"""Train (fine-tune) GR00T N1.5 on LIBERO demonstrations and save it in the released checkpoint layout.

    python -m models.gr00t.train --demos 'artifacts/demos/libero_spatial/*.hdf5' --out DIR \
        [--init DIR | --preset tiny|tiny_wide_vision|small] [--steps N] [--batch-size B] [--lr LR] [--seed S] \
        [--device cpu|cuda] [--denoising-steps 8] [--resume]

Every sample is one demonstration step: both camera images (as the evaluation client sends them), the 8-D
state, the instruction, and the 16-step action chunk that starts there (padded at the episode end by repeating
the last action). The whole model trains (vision tower, projector, LLM, VL self-attention, DiT, state/action
encoders and decoder) with GR00T's flow-matching loss. ``--init`` fine-tunes any released-format GR00T N1.5
directory (a 3B one on a GPU, or a tiny one); without it a fresh same-architecture model is built from
``--preset``.

Why the statistics are recomputed: a policy's ``metadata.json`` must describe *its* training data, or the
normalisation at serving time maps actions to the wrong range. They are taken from the training split (per
modality key: min/max/mean/std/q01/q99, upstream's layout) and replace whatever ``--init`` carried.

Resumable and seeded: the loop is :func:`models.common.training.fit`, whose ``OUT/train_state`` holds
``model.safetensors``, ``optimizer.pt`` (tensors only, read with ``weights_only=True``) and ``state.json``.
Batches, crops and flow-matching noise are drawn from generators seeded by ``(seed, step)``, so a run resumed at
step k continues exactly as an uninterrupted run would (resuming rebuilds the model from ``--init`` or
``--preset`` first, then loads the checkpoint's weights). The held-out action MAE (Euler sampler with
``--denoising-steps`` steps, fixed noise) goes to ``OUT/train_metrics.json``.

At scale (models/common/scale.py): ``--lora-r 32`` puts peft LoRA adapters on the Qwen3 projections (the action head
stays fully trainable, the vision tower and projector frozen) and merges them into the saved LLM; ``--precision
bf16``, ``--grad-accum N``, ``--grad-checkpointing`` (Qwen3 and SigLIP), ``torchrun --nproc-per-node N`` for data
parallel (``--data-parallel fsdp`` shards weights, gradients and AdamW states over the ranks, one FSDP group per
Qwen3 decoder layer); a memory estimate is printed first and a run that cannot fit is refused (``--memory-check off``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.dataset import add_extra_samples, add_extra_share_argument, extra_share_kwargs, random_crop
from client.dataset import load_samples as load_demo_samples
from models.common import scale, training
from models.common.serving import write_serving_file
from models.gr00t.config import GR00TConfig
from models.gr00t.data_config import LiberoDataConfig, make_metadata
from models.gr00t.modeling import GR00TPolicyModel

logger = logging.getLogger("models.gr00t.train")

STATE_DIR = "train_state"
METRICS_FILE = "train_metrics.json"
HORIZON = 16
PRESETS = ("tiny", "tiny_wide_vision", "small")
#: How the project serves the GR00T it trains, written as the output's ``serving.json`` (the server applies it under
#: the user's own flags; ``models/common/serving.py``). Measured on the shipped tiny GR00T, libero_spatial init
#: states 0-29: sampling from zero initial noise (the prior's mean, one deterministic chunk per observation)
#: 196/300 against 146/300 from upstream's Gaussian draw (paired 80 vs 30, p < 0.0001); executing 8 of each
#: 16-step chunk before asking again 55/100 against 38/100 executing whole chunks (paired 26 vs 9, p = 0.006).
SERVING_POLICY_OPTIONS = {"replan_steps": 8, "initial_noise": "zero"}
SERVING_NOTE = ("How this checkpoint is served (a flag given to the server overrides its entry; --no-serving-defaults "
                "ignores the file). Shipped tiny GR00T, libero_spatial init states 0-29, seed 7: 196/300 = 65.3% "
                "served so, 146/300 from upstream's Gaussian initial noise (paired 80 vs 30, p < 0.0001; "
                "docs/results/libero_spatial_2026-12-07_gr00t_zero_noise.json); whole 16-step chunks 38/100 against "
                "55/100 with replan_steps 8 (docs/results/libero_spatial_2026-12-07_gr00t_replan.json).")


def write_serving(out: str | Path, denoising_steps: int) -> Path:
    """``out/serving.json``: how the project serves the GR00T it trains (the trainer and the installer write it)."""
    return write_serving_file(out, "gr00t", {"denoising_steps": denoising_steps, "embodiment_tag": "new_embodiment"},
                              SERVING_POLICY_OPTIONS, SERVING_NOTE)


# ---------------------------------------------------------------------------------------------- statistics
def _key_stats(x: np.ndarray) -> dict[str, list[float]]:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return {"min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(),
            "std": x.std(0).tolist(), "q01": np.quantile(x, 0.01, axis=0).tolist(),
            "q99": np.quantile(x, 0.99, axis=0).tolist()}


def compute_statistics(states: np.ndarray, actions: np.ndarray,
                       data_config: LiberoDataConfig | None = None) -> dict[str, Any]:
    """``metadata.json`` content (embodiment ``data_config.embodiment_tag``) from raw ``[N, 8]`` states and
    ``[N, 7]`` per-step actions, split into the data config's modality keys (gripper state is 2-D)."""
    dc = data_config or LiberoDataConfig()
    if states.shape[-1] != dc.state_dim or actions.shape[-1] != dc.action_dim:
        raise ValueError(f"expected {dc.state_dim}-D states and {dc.action_dim}-D actions, "
                         f"got {states.shape[-1]} and {actions.shape[-1]}")

    def split(arr: np.ndarray, keys: dict[str, int]) -> dict[str, dict[str, list[float]]]:
        out, i = {}, 0
        for key, width in keys.items():
            out[key.split(".", 1)[1]] = _key_stats(arr[:, i:i + width])
            i += width
        return out

    return make_metadata(dc, split(states, dc.state_keys), split(actions, dc.action_keys))


# ---------------------------------------------------------------------------------------------- model
def preset_config(preset: str, vocab_size: int, image_token_index: int, bos_id: int, eos_id: int) -> GR00TConfig:
    """``tiny`` is :func:`models.gr00t.tiny.tiny_config` (3.2M parameters, 34 ms per 8-step chunk on one CPU
    thread); ``tiny_wide_vision`` (4.0M) spends the extra parameters on perception only (:func:`_wide_vision`:
    1.3x the training step, 46 ms per chunk); ``small`` (15.0M) doubles the widths and depths of the LLM, vision
    tower and DiT (4.7x the training step and 111 ms per chunk: over the 60 ms serving budget)."""
    from models.gr00t.tiny import tiny_config

    cfg = tiny_config(vocab_size, image_token_index, bos_id, eos_id)
    if preset == "tiny":
        return cfg
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {PRESETS}, got {preset!r}")
    d = cfg.to_dict()
    if preset == "tiny_wide_vision":
        return GR00TConfig.from_dict(_wide_vision(d))
    llm = 256
    d["hidden_size"] = llm
    d["backbone_cfg"]["select_layer"] = 4
    e = d["eagle_config"]
    e["select_layer"] = 4
    e["text_config"].update(hidden_size=llm, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=32)
    e["vision_config"].update(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
    h = d["action_head_cfg"]
    h.update(backbone_embedding_dim=llm, hidden_size=128, input_embedding_dim=192)
    h["diffusion_model_cfg"].update(attention_head_dim=24, num_attention_heads=8, num_layers=6, output_dim=128,
                                    cross_attention_dim=llm)
    h["vl_self_attention_cfg"].update(attention_head_dim=32, num_attention_heads=8, num_layers=2)
    return GR00TConfig.from_dict(d)


def _wide_vision(d: dict[str, Any]) -> dict[str, Any]:
    """The tiny model with twice the vision tower's width and a third layer, and all three LLM layers; the action
    head is the tiny one (it runs once per denoising step, so it sets the latency)."""
    d["backbone_cfg"]["select_layer"] = 3
    e = d["eagle_config"]
    e["select_layer"] = 3
    e["vision_config"].update(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4)
    return d


def build_fresh(preset: str, seed: int) -> GR00TPolicyModel:
    """A randomly initialised model of ``preset`` with the project's offline-trained Qwen-style tokenizer."""
    from models.common.tokenizer import train_qwen_style
    from models.gr00t.tiny import VOCAB_BPE

    tok = train_qwen_style(VOCAB_BPE)
    vocab = ((tok.get_vocab_size() + 63) // 64) * 64
    torch.manual_seed(seed)
    cfg = preset_config(preset, vocab, tok.token_to_id("<IMG_CONTEXT>"), tok.token_to_id("<|endoftext|>"),
                        tok.token_to_id("<|im_end|>"))
    model = GR00TPolicyModel(cfg)
    model.tokenizer = tok
    return model


@contextlib.contextmanager
def _no_eval_crop(model: GR00TPolicyModel) -> Iterator[None]:
    """Training images arrive already randomly cropped; skip the eval-time centre crop while they are prepared."""
    old = model.data_config.crop_scale
    model.data_config.crop_scale = 1.0
    try:
        yield
    finally:
        model.data_config.crop_scale = old


def _random_crops(images: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Upstream's training ``VideoCrop(scale)``: a random square window of side ``scale``; eval takes the centre."""
    return random_crop(images, scale * scale, rng)


def _obs(model: GR00TPolicyModel, samples: Any, idx: np.ndarray, images: np.ndarray | None = None,
         wrists: np.ndarray | None = None) -> dict[str, Any]:
    return model.data_config.from_libero(
        samples.images[idx] if images is None else images,
        samples.wrist_images[idx] if wrists is None else wrists,
        samples.states[idx], [samples.instruction(int(k)) for k in idx])


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: GR00TPolicyModel, samples: Any, denoising_steps: int, max_samples: int = 256,
             batch: int = 16, seed: int = 0) -> dict[str, float]:
    """Held-out flow-matching loss and action MAE of the Euler sampler (raw env units, fixed noise)."""
    was_training = model.training
    model.eval()
    n = min(len(samples), max_samples)
    if n == 0:
        return {}
    idx_all = np.linspace(0, len(samples) - 1, n).astype(int)
    # the sampler draws its noise on the model's device, so the generator must live there too
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    torch_state = torch.get_rng_state()
    torch.manual_seed(seed)
    abs_err, first_err, losses = [], [], []
    for i in range(0, n, batch):
        j = idx_all[i:i + batch]
        obs = _obs(model, samples, j)
        pred = model.get_action(obs, denoising_steps=denoising_steps, generator=gen).numpy()
        err = np.abs(pred - samples.chunks[j])
        abs_err.append(err.mean(axis=(1, 2)))
        first_err.append(err[:, 0].mean(axis=1))
        losses.append(float(model(model.training_inputs(obs, samples.chunks[j]))["loss"]) * len(j))
    torch.set_rng_state(torch_state)
    model.train(was_training)
    return {"heldout_action_mae": float(np.concatenate(abs_err).mean()),
            "heldout_first_step_action_mae": float(np.concatenate(first_err).mean()),
            "heldout_flow_loss": float(sum(losses) / n), "heldout_eval_samples": int(n),
            "denoising_steps": int(denoising_steps)}


# ---------------------------------------------------------------------------------------------- training
def load_samples(demos: str, max_demos_per_task: int | None = None) -> Any:
    """All demonstration steps with 16-step chunks; both cameras and the 8-D state are required."""
    samples = load_demo_samples(demos, chunk_len=HORIZON, max_demos_per_task=max_demos_per_task)
    if samples.wrist_images is None or samples.states is None:
        raise ValueError(f"{demos}: GR00T needs obs/eye_in_hand_rgb and obs/state_8d in every demonstration")
    return samples


def _preflight(model: GR00TPolicyModel, args: argparse.Namespace, world: int, lora: scale.LoraOptions) -> None:
    """Print the memory estimate of this run (per device) and refuse one that cannot fit."""
    from models.common.memory import preflight

    text = model.config.eagle_config["text_config"]
    seq = 2 * model.tokens_per_image + 48  # two cameras + prompt; the DiT's action tokens are few
    preflight(model, args.device, log=logger.info, enabled=args.memory_check == "on",
              batch=max(1, args.batch_size // (args.grad_accum * world)), seq=seq, hidden=int(text["hidden_size"]),
              layers=len(model.backbone.eagle_model.language_model.model.layers),
              intermediate=int(text["intermediate_size"]), checkpointing=args.grad_checkpointing,
              precision=args.precision, lora_r=lora.r, lora_targets=len(lora.targets),
              shards=scale.fsdp_shards(args, world), what="GR00T N1.5 fine-tune")


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) training; write the released-layout checkpoint and metrics into ``args.out``."""
    import models
    from models.gr00t.tiny import save_pretrained

    rank, world, args.device = scale.init_distributed(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = load_samples(args.demos, args.max_demos_per_task)
    train_set, held = samples.split_by_demo(args.heldout_frac, args.seed)
    if len(train_set) == 0:
        raise ValueError("no training samples after the held-out split")
    actions = train_set.chunks[:, 0]  # every demonstration step's own action, once
    metadata = compute_statistics(train_set.states, actions)
    num_demo_samples = len(train_set)
    train_set = add_extra_samples(train_set, args.extra_demos, HORIZON)  # after the statistics: they stay the demos'

    if args.init:
        model = models.load_pretrained("gr00t", args.init, device=args.device)
    else:
        model = build_fresh(args.preset, args.seed).to(args.device)
    # keep other embodiments' statistics a released checkpoint carries; ours replace new_embodiment's
    model.metadata = {**(model.metadata or {}), **metadata}
    model.data_config.embodiment_tag = "new_embodiment"
    model.denoising_steps = args.denoising_steps
    lora = scale.prepare_model(model, model.backbone.eagle_model.language_model, args,
                               keep_trainable=[model.action_head])
    _preflight(model, args, world, lora)
    logger.info("GR00T: %.2fM trainable parameters, %d train / %d held-out samples (%d/%d demos), %d steps",
                sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, len(train_set), len(held),
                len(np.unique(train_set.demo_of)), len(np.unique(held.demo_of)), args.steps)

    def batch_loss(batch: training.Batch) -> torch.Tensor:
        j = batch.index
        imgs = _random_crops(train_set.images[j], args.crop_scale, batch.rng)
        wrists = _random_crops(train_set.wrist_images[j], args.crop_scale, batch.rng)
        with _no_eval_crop(model):
            inputs = model.training_inputs(_obs(model, train_set, j, imgs, wrists), train_set.chunks[j])
        return model(inputs)["loss"]

    def validate() -> dict[str, float]:
        return evaluate(model, held, args.denoising_steps, max_samples=min(128, args.eval_samples), seed=args.seed)

    tcfg = training.TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
        weight_decay=args.weight_decay, betas=(0.95, 0.999), grad_clip=1.0, seed=args.seed,
        save_every=args.save_every, eval_every=args.eval_every, log_every=20, desc="gr00t", ema_decay=args.ema,
        **scale.train_config_kwargs(args), **extra_share_kwargs(args.extra_share, num_demo_samples, len(train_set)))
    extra = {"demos": str(args.demos), "seed": args.seed, "preset": None if args.init else args.preset,
             "init": args.init}
    result = training.fit(model, len(train_set), tcfg, batch_loss, validate=validate if len(held) else None,
                          checkpoint_dir=out / STATE_DIR, resume=args.resume, meta=extra)
    step, losses = result.step, result.losses
    history = [h for h in result.history if "heldout_action_mae" in h]
    scale.finish_model(model)  # LoRA merged into the LLM, fp32: the released format
    model.eval()
    if rank != 0:  # rank 0 evaluates and saves
        return {"steps": step, "rank": rank}
    metrics: dict[str, Any] = evaluate(model, held, args.denoising_steps, args.eval_samples, seed=args.seed)
    if not metrics:
        logger.warning("no held-out demonstrations (--heldout-frac %s): held-out MAE not measured", args.heldout_frac)
    tail = [v for _, v in losses[-max(1, len(losses) // 5):]]
    metrics.update({
        "steps": step, "train_seconds_this_run": round(result.seconds, 1), "train_samples": len(train_set),
        "heldout_samples": len(held), "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "ema_decay": args.ema, "extra_samples": len(train_set) - num_demo_samples, "extra_share": args.extra_share,
        "init": args.init, "preset": None if args.init else args.preset, "demos": str(args.demos),
        "train_loss_first": losses[0][1] if losses else None,
        "train_loss_last_fifth_mean": float(np.mean(tail)) if losses else None,
        "train_loss_curve": losses[:: max(1, len(losses) // 50)], "history": history,
    })
    save_pretrained(model, out, num_shards=args.shards)
    write_serving(out, args.denoising_steps)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("saved %s (serve with: ./run_inference_server.sh --policy gr00t --model-path %s; its serving.json "
                "sets %d denoising steps, %s)", out, out, args.denoising_steps, SERVING_POLICY_OPTIONS)
    return metrics


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.gr00t.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demos", required=True, help="glob of LIBERO-layout HDF5 files (both cameras + state_8d)")
    p.add_argument("--out", required=True, help="output checkpoint directory (released GR00T N1.5 layout)")
    p.add_argument("--extra-demos", default=None,
                   help="glob of more episodes for the training split only (never held out, not in the statistics): "
                        "DAgger episodes written by run_libero_eval.sh --expert-labels")
    add_extra_share_argument(p)
    p.add_argument("--init", default=None, help="released-format GR00T N1.5 directory to fine-tune")
    p.add_argument("--preset", default="tiny", choices=PRESETS, help="fresh model size when --init is not given")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (upstream fine-tunes 3B at 1e-4)")
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--crop-scale", type=float, default=0.95, help="random-crop side fraction (eval: centre crop)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--denoising-steps", type=int, default=8, help="Euler steps for the held-out action MAE")
    p.add_argument("--heldout-frac", type=float, default=0.1)
    p.add_argument("--max-demos-per-task", type=int, default=None)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state if present")
    p.add_argument("--ema", type=float, default=0.0,
                   help="EMA decay of the weights that are validated and saved (0 = last iterate; e.g. 0.999)")
    scale.add_scale_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.batch_size < 1:
        raise SystemExit("--steps and --batch-size must be >= 1")
    if args.init and not Path(args.init).is_dir():
        raise SystemExit(f"--init {args.init}: not a directory")
    result = train(args)
    if not scale.is_main_process():
        return 0
    print(json.dumps({k: v for k, v in result.items() if k not in ("history", "train_loss_curve")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
