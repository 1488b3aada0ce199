"""Train the OpenVLA-RSD policy: main model (backbone + RFSQ layer head), then the draft.

    python -m rsd.train_vla main  --demos 'artifacts/demos/libero_spatial/*.hdf5' --rfsq DIR --out DIR \
        [--init BACKBONE_DIR | --preset tiny|small] [--steps N] [--batch-size B] [--device cpu|cuda] [--resume] \
        [--proprio] [--wrist]
    python -m rsd.train_vla draft --model DIR --demos GLOB [--steps N] [--max-samples N]

``main`` fine-tunes the whole backbone (vision towers, projector, LLM) and the layer head with teacher-forced
cross-entropy over the 8 RFSQ layers of the action chunk that starts at each demonstration step; ``--init`` takes
any released-format OpenVLA directory (a 7B one on a GPU, or the project's tiny one) or a released OpenVLA-OFT one
(``openvla-7b-oft-finetuned-libero-*``, told apart by its ``action_head--*_checkpoint`` file; see
:func:`_oft_init`), ``--preset`` builds a fresh same-architecture backbone. ``--proprio`` adds the normalised 8-D
state as one projected prefix token and ``--wrist`` the wrist camera's patches (OpenVLA-OFT's extra inputs; the
demonstrations must hold them); the draft stage and the server read the choice from ``rsd/rsd_config.json``.
``draft`` freezes that main model and trains the draft to imitate main's own greedy coarse layers (distillation;
see rsd/draft.py), reporting per-layer code and whole-layer agreement on held-out demonstrations. Both stages
run the shared loop (:func:`models.common.training.fit`): seeded, tqdm progress plus a log line every few steps;
``main`` resumes exactly from ``OUT/train_state`` (safetensors weights; optimizer tensors loaded with
``weights_only=True``).

At scale (``main``; see models/common/scale.py): ``--lora-r 32`` trains peft LoRA adapters on the Llama projections
(``--lora-targets``) plus the RFSQ layer head and proprio projector, everything else frozen, and merges the adapters
into the saved backbone (a plain released-format directory); ``--precision bf16`` autocasts (frozen weights stored in
bf16 with LoRA), ``--grad-accum N`` splits each step's ``--batch-size`` into N micro-batches,
``--grad-checkpointing`` recomputes the Llama activations; ``torchrun --nproc-per-node N -m rsd.train_vla
main ...`` runs data parallel (one shard of every step's batch per rank; rank 0 logs, validates and saves), with
``--data-parallel fsdp`` sharded (FSDP2 per Llama decoder layer: a full 7B fine-tune on 8 x 80 GB). A memory
estimate is printed before the run and a run that cannot fit the device is refused (``--memory-check off``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from client.dataset import (
    DemoSamples,
    add_extra_samples,
    add_extra_share_argument,
    extra_share_kwargs,
    load_samples,
    random_crop,
)
from models.common import scale, training
from models.openvla.tiny import PRESETS
from rsd.vla import (
    RSD_CONFIG,
    RSD_DIR,
    OpenVLARSD,
    VLARSDConfig,
    has_rsd_parts,
    load_layer_head,
    load_openvla_rsd,
    load_proprio_projector,
)

logger = logging.getLogger("rsd.train_vla")
STATE_DIR = "train_state"
CROP_AREA = 0.9


def _tokens_for(samples: DemoSamples, tokenizer, batch: int = 4096) -> torch.Tensor:
    """RFSQ layers ``[N, L, 128]`` of every sample's action chunk (computed once, frozen tokenizer)."""
    from rsd.rfsq import tokens_to_layers

    out = []
    with torch.no_grad():
        for i in range(0, len(samples), batch):
            out.append(tokens_to_layers(tokenizer.encode(samples.chunks[i:i + batch])))
    return torch.cat(out).to(torch.long)


def parse_layer_weights(text: str, flag: str = "--layer-weights") -> list[float] | None:
    """``"8,4,4,2,1,0.5,0.5,0.5"`` -> one weight per RFSQ layer; ``""`` -> None (equal weights)."""
    if not text.strip():
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: {flag} {text!r}: expected comma-separated numbers, "
                         "e.g. 8,4,4,2,1,0.5,0.5,0.5") from None
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise SystemExit(f"error: {flag} {text!r}: weights must be >= 0 with a positive sum")
    return weights


def _action_stats(chunks: np.ndarray) -> dict:
    a = chunks[:, 0].astype(np.float64)
    q01, q99 = np.quantile(a, 0.01, axis=0), np.quantile(a, 0.99, axis=0)
    return {"action": {"mean": a.mean(0).tolist(), "std": a.std(0).tolist(), "min": a.min(0).tolist(),
                       "max": a.max(0).tolist(), "q01": q01.tolist(), "q99": q99.tolist(),
                       "mask": [True] * (a.shape[1] - 1) + [False]},
            "num_transitions": int(len(a))}


def _proprio_stats(states: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-dimension mean/std of the training states (std floored: a constant dimension must not blow up)."""
    s = states.astype(np.float64)
    return s.mean(0).tolist(), np.maximum(s.std(0), 1e-6).tolist()


def _check_inputs(cfg: VLARSDConfig, samples: DemoSamples, what: str) -> None:
    """Fail early, naming the missing HDF5 key, when the config needs inputs the demonstrations lack."""
    from client.dataset import STATE_KEY, WRIST_KEY

    if cfg.use_proprio and samples.states is None:
        raise SystemExit(f"{what}: the model uses proprio (--proprio) but the demonstrations have no obs/{STATE_KEY}")
    if cfg.use_wrist_image and samples.wrist_images is None:
        raise SystemExit(f"{what}: the model uses the wrist camera (--wrist) but the demonstrations have no "
                         f"obs/{WRIST_KEY}")


def _extra_inputs(model: OpenVLARSD, samples: DemoSamples, j: np.ndarray) -> dict:
    """``states`` / ``wrist_images`` for :meth:`OpenVLARSD.prefix` when the model's config uses them."""
    out: dict = {}
    if model.cfg.use_proprio:
        out["states"] = samples.states[j]
    if model.cfg.use_wrist_image:
        out["wrist_images"] = samples.wrist_images[j]
    return out


def _build_backbone(args: argparse.Namespace):
    """The backbone to fine-tune: ``--init`` loaded as a released OpenVLA directory (an OpenVLA-OFT directory's
    merged backbone is one: the same files, the OFT head files beside them are not read here), else a fresh
    ``--preset``."""
    import models
    from models.openvla import tiny

    if args.init:
        model = models.load_pretrained("openvla", args.init, device=args.device)
        if args.patch_size:
            from models.openvla.repatch import repatch

            model = repatch(model, args.patch_size)
        return model
    if args.patch_size:
        raise SystemExit("error: --patch-size re-grids an --init checkpoint's vision towers; a fresh backbone takes "
                         "its grid from --preset (small_p8: 8-pixel patches)")
    model = tiny.build_tiny(args.preset, seed=args.seed)
    return model.to(args.device)


@dataclass
class OFTInit:
    """What an OpenVLA-OFT ``--init`` directory offers the RSD main model besides its backbone."""

    root: Path
    action_head: Path  # never loaded: RSD decodes RFSQ layers with its own head
    proprio_path: Path | None
    proprio: dict[str, torch.Tensor] | None  # read only when --proprio is on
    proprio_stats: dict[str, Any] | None  # the OFT's ``bounds_q99`` proprio statistics, when it has them
    stats_key: str | None


def _oft_proprio_stats(norm_stats: dict[str, Any], key: str) -> tuple[str, dict[str, Any]] | None:
    """The OFT's proprio statistics for ``key`` (``<key>_no_noops`` too, as OFT's LIBERO harness), else the only
    dataset that has any; ``None`` when that is ambiguous or absent."""
    for k in (key, f"{key}_no_noops"):
        if "proprio" in norm_stats.get(k, {}):
            return k, norm_stats[k]["proprio"]
    with_proprio = [k for k, v in norm_stats.items() if isinstance(v, dict) and "proprio" in v]
    return (with_proprio[0], norm_stats[with_proprio[0]]["proprio"]) if len(with_proprio) == 1 else None


def _oft_init(args: argparse.Namespace, norm_stats: dict[str, Any]) -> OFTInit | None:
    """Inspect ``--init`` when it is an OpenVLA-OFT directory (else ``None``) and log what RSD takes from it.

    ``norm_stats`` are the backbone's statistics as loaded, read before the main stage replaces them with the
    demonstrations' own: the OFT's proprio range is what its projector was trained on. Only advice is logged for
    the input flags (the OFT was fine-tuned with both cameras); the user's ``--wrist`` / ``--proprio`` stand.
    """
    from models.openvla import oft

    if not args.init or not oft.is_oft_dir(args.init):
        return None
    root = Path(args.init)
    head = oft.find_component(root, oft.ACTION_HEAD)
    assert head is not None
    proprio_path = oft.find_component(root, oft.PROPRIO_PROJECTOR, required=False)
    logger.info("--init %s is an OpenVLA-OFT checkpoint: its merged backbone (vision towers, projector, LLM) "
                "initialises the RSD backbone; OFT fine-tuned that LLM with bidirectional attention, RSD runs it "
                "causally and the main stage adapts it", root)
    logger.info("%s: the L1-regression action head is not used (RSD predicts RFSQ layers); the RSD layer head "
                "(code/layer embeddings + logits head) is freshly initialised", head.name)
    if not args.wrist:
        logger.warning("OpenVLA-OFT checkpoints are fine-tuned on two cameras (third-person + wrist) but --wrist "
                       "is off: this RSD model will see the third-person camera only. Pass --wrist (WRIST=1 in "
                       "scripts/train_default_model.sh) to keep the wrist input the backbone was trained with")
    proprio = None
    if proprio_path is None:
        if args.proprio:
            logger.info("%s has no proprio projector: the RSD proprio projector is freshly initialised", root)
    elif not args.proprio:
        logger.info("%s is not used (--proprio is off)", proprio_path.name)
    else:
        proprio = oft.read_component(proprio_path)
    found = _oft_proprio_stats(norm_stats, args.unnorm_key) if proprio is not None else None
    return OFTInit(root=root, action_head=head, proprio_path=proprio_path, proprio=proprio,
                   proprio_stats=None if found is None else found[1], stats_key=None if found is None else found[0])


def _bounds_as_mean_std(stats: dict[str, Any], dim: int) -> tuple[list[float], list[float]] | None:
    """OFT's ``bounds_q99`` map ``2 (s - q01) / (q99 - q01 + eps) - 1`` written as RSD's ``(s - mean) / std``
    (``mask``-false dimensions pass through: mean 0, std 1); ``None`` if the statistics are not ``dim``-D.
    OFT also clips the result to [-1, 1]; RSD does not (states beyond the 1st/99th percentiles stay linear)."""
    from models.openvla.oft import NORM_EPS

    q01, q99 = np.asarray(stats.get("q01", []), np.float64), np.asarray(stats.get("q99", []), np.float64)
    if q01.shape != (dim,) or q99.shape != (dim,):
        return None
    mask = np.asarray(stats.get("mask", np.ones(dim, dtype=bool)), dtype=bool)
    mean = np.where(mask, (q01 + q99) / 2.0, 0.0)
    std = np.where(mask, (q99 - q01 + NORM_EPS) / 2.0, 1.0)
    return mean.tolist(), std.tolist()


def _init_from_oft(model: OpenVLARSD, init: OFTInit) -> dict[str, Any]:
    """Copy the OFT's proprio projector into ``model`` when the shapes match, and normalise the state as OFT did.

    The projector learnt its map on OFT's q01/q99-normalised states, so reusing it is only worth anything with
    that same normalisation: the config's mean/std are rewritten from the OFT's statistics. Returns the record
    of what was reused and what was freshly initialised (kept in ``train_main_metrics.json``).
    """
    reused = ["backbone (vision towers, projector, LLM)"]
    fresh = ["rsd layer head"]
    record: dict[str, Any] = {"path": str(init.root), "kind": "openvla-oft", "unused": [init.action_head.name]}
    proj = model.proprio_projector
    if proj is not None and init.proprio is not None:
        want = {k: tuple(v.shape) for k, v in proj.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in init.proprio.items()}
        if want != got:
            logger.warning("%s does not match the RSD proprio projector (its shapes %s, needed %s for %d-D states "
                           "and LLM width %d): freshly initialised", init.proprio_path, got, want,
                           model.cfg.proprio_dim, model.hidden_size)
            fresh.append("proprio projector")
        else:
            proj.load_state_dict(init.proprio, strict=True)
            reused.append("proprio projector")
            norm = (None if init.proprio_stats is None
                    else _bounds_as_mean_std(init.proprio_stats, model.cfg.proprio_dim))
            if norm is None:
                logger.warning("%s/dataset_statistics.json: no usable %d-D proprio q01/q99 for this run's "
                               "--unnorm-key: the state is normalised with the demonstrations' mean/std, not the "
                               "range the OFT projector was trained on", init.root, model.cfg.proprio_dim)
            else:
                model.cfg.proprio_mean, model.cfg.proprio_std = norm
                logger.info("proprio projector initialised from %s; states normalised with the OFT's %r q01/q99 "
                            "range (bounds_q99, as the projector was trained)", init.proprio_path.name,
                            init.stats_key)
            record["proprio_stats_key"] = init.stats_key if norm is not None else None
    elif proj is not None:
        fresh.append("proprio projector")
    elif init.proprio_path is not None:
        record["unused"].append(init.proprio_path.name)
    record |= {"reused": reused, "fresh": fresh}
    logger.info("OFT init: reused %s; freshly initialised %s; unused %s", ", ".join(reused), ", ".join(fresh),
                ", ".join(record["unused"]))
    return record


def _same_tokenizer(a, b) -> bool:  # noqa: ANN001 - two RFSQTokenizers
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return (a.config.to_dict() == b.config.to_dict() and sa.keys() == sb.keys()
            and all(torch.equal(sa[k], sb[k]) for k in sa)
            and all(np.array_equal(np.asarray(getattr(a.normalizer, f)), np.asarray(getattr(b.normalizer, f)))
                    for f in vars(a.normalizer)))


def _init_from_rsd(model: OpenVLARSD, init: str | Path, tokenizer) -> dict[str, Any]:  # noqa: ANN001
    """``--init`` an OpenVLA-RSD directory: its RFSQ layer head (and proprio projector with its state
    normalisation, when both models read the state) continue training with the backbone; the draft is not read
    (the draft stage distils a new one). The head's codes are only meaningful under the tokenizer it was trained
    with, so ``--rfsq`` must be the init's own (``INIT/rsd/rfsq``). Returns the record kept in
    ``train_main_metrics.json``."""
    from rsd.rfsq import RFSQTokenizer

    root = Path(init)
    init_cfg = VLARSDConfig.from_dict(json.loads((root / RSD_DIR / RSD_CONFIG).read_text()))
    init_rfsq = root / RSD_DIR / init_cfg.rfsq_dir
    if not _same_tokenizer(tokenizer, RFSQTokenizer.from_pretrained(init_rfsq)):
        raise SystemExit(f"error: --rfsq is not the RFSQ tokenizer --init {root} was trained with: its layer head "
                         f"would predict codes that mean other actions. Pass --rfsq {init_rfsq}")
    load_layer_head(model, root)
    reused, fresh, unused = ["backbone (vision towers, projector, LLM)", "rsd layer head"], [], ["draft"]
    proj = model.proprio_projector
    if proj is not None and init_cfg.use_proprio and init_cfg.proprio_dim == model.cfg.proprio_dim:
        load_proprio_projector(model, root)
        model.cfg.proprio_mean, model.cfg.proprio_std = init_cfg.proprio_mean, init_cfg.proprio_std
        reused.append("proprio projector")
    elif proj is not None:
        fresh.append("proprio projector")
    elif init_cfg.use_proprio:
        unused.append("proprio projector")
    if init_cfg.use_wrist_image != model.cfg.use_wrist_image:
        logger.warning("--init %s was trained %s the wrist camera; this run %s it", root,
                       "with" if init_cfg.use_wrist_image else "without",
                       "uses" if model.cfg.use_wrist_image else "does not use")
    record = {"path": str(root), "kind": "openvla-rsd", "reused": reused, "fresh": fresh, "unused": unused,
              "patch_size": model.backbone.config.vision_configs()[0].patch_size}
    logger.info("OpenVLA-RSD init: reused %s; freshly initialised %s; unused %s", ", ".join(reused),
                ", ".join(fresh) or "nothing", ", ".join(unused))
    return record


@torch.no_grad()
def evaluate_main(model: OpenVLARSD, samples: DemoSamples, layers: torch.Tensor, batch: int = 64,
                  max_samples: int = 2048) -> dict:
    """Held-out teacher-forced loss/accuracy and the action error of greedy decoding (the real metric), and of the
    ``expected`` action decode (main's distributions given its greedy layers, what the server's
    ``--rsd-action-decode expected`` sends)."""
    from rsd.vla import chunk_actions_from_tokens

    model.eval()
    n = min(len(samples), max_samples)
    idx = np.linspace(0, len(samples) - 1, n).astype(int)
    losses, accs, action_err, expected_err, layer_acc = [], [], [], [], []
    for i in range(0, n, batch):
        j = idx[i:i + batch]
        pv = model.processor.preprocess_images(samples.images[j], True)
        extra = _extra_inputs(model, samples, j)
        wpv = (model.processor.preprocess_images(extra.pop("wrist_images"), True)
               if "wrist_images" in extra else None)
        instr = [samples.instruction(k) for k in j]
        loss, logits = model.training_loss(pv, instr, layers[j], states=extra.get("states"), wrist_pixel_values=wpv)
        losses.append(float(loss))
        hit = (logits.argmax(-1) == layers[j]).float()
        accs.append(float(hit.mean()))
        layer_acc.append(hit.mean(dim=(0, 2)).tolist())
        embeds, mask = model.prefix(None, instr, pixel_values=pv, states=extra.get("states"), wrist_pixel_values=wpv)
        greedy = model.main.decode_greedy(embeds, mask)
        pred = chunk_actions_from_tokens(model, greedy)
        action_err.append(float(np.abs(pred - samples.chunks[j]).mean()))
        with torch.no_grad():
            main_logits = model.main(embeds, greedy, mask)[1].float()
        expected = model.tokenizer.decode_expected(main_logits.softmax(-1)).numpy()
        expected_err.append(float(np.abs(expected - samples.chunks[j]).mean()))
    model.train()
    return {"heldout_loss": float(np.mean(losses)), "heldout_code_accuracy": float(np.mean(accs)),
            "heldout_greedy_action_mae": float(np.mean(action_err)),
            "heldout_expected_action_mae": float(np.mean(expected_err)),
            "heldout_layer_accuracy": [round(float(a), 4) for a in np.mean(layer_acc, axis=0)]}


def _preflight(model: OpenVLARSD, args: argparse.Namespace, world: int, lora: scale.LoraOptions) -> None:
    """Print the memory estimate of this run (per device) and refuse one that cannot fit."""
    from models.common.memory import preflight

    llm_cfg = model.main.backbone.config
    seq = (1 + model.backbone.num_patches * (2 if model.cfg.use_wrist_image else 1) + 32
           + int(model.cfg.use_proprio) + model.cfg.num_layers - 1)
    preflight(model, args.device, log=logger.info, enabled=args.memory_check == "on",
              batch=max(1, args.batch_size // (args.grad_accum * world)), seq=seq,
              hidden=int(llm_cfg.hidden_size), layers=int(llm_cfg.num_hidden_layers),
              intermediate=int(llm_cfg.intermediate_size), checkpointing=args.grad_checkpointing,
              precision=args.precision, lora_r=lora.r, lora_targets=len(lora.targets),
              logits_dim=model.cfg.codes_per_layer * model.cfg.levels, shards=scale.fsdp_shards(args, world),
              what="OpenVLA-RSD main stage")


def train_main(args: argparse.Namespace) -> dict:
    from rsd.rfsq import RFSQTokenizer

    rank, world, args.device = scale.init_distributed(args.device)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = load_samples(args.demos, max_demos_per_task=args.max_demos_per_task)
    expert_train, held = samples.split_by_demo(args.heldout_frac, args.seed)
    train = add_extra_samples(expert_train, args.extra_demos, samples.chunks.shape[1])
    tokenizer = RFSQTokenizer.from_pretrained(args.rfsq)
    train_layers = _tokens_for(train, tokenizer)
    held_layers = _tokens_for(held, tokenizer) if len(held) else torch.zeros(0, 8, 128, dtype=torch.long)
    backbone = _build_backbone(args)
    oft_init = _oft_init(args, backbone.norm_stats or {})  # before the demos' statistics replace the OFT's
    backbone.norm_stats = {args.unnorm_key: _action_stats(samples.chunks)}
    backbone.config.norm_stats = backbone.norm_stats
    cfg = VLARSDConfig(center_crop=True, trained_on=str(args.demos), use_proprio=args.proprio,
                       use_wrist_image=args.wrist)
    _check_inputs(cfg, samples, "main")
    if cfg.use_proprio:
        cfg.proprio_dim = int(train.states.shape[1])
        cfg.proprio_mean, cfg.proprio_std = _proprio_stats(expert_train.states)
    model = OpenVLARSD(backbone, cfg).to(args.device)
    if oft_init is not None:
        init_record = _init_from_oft(model, oft_init)
    elif args.init and has_rsd_parts(args.init):
        init_record = _init_from_rsd(model, args.init, tokenizer)
    else:
        init_record = None
    model.tokenizer = tokenizer
    lora = scale.prepare_model(model, model.backbone.language_model, args, keep_trainable=[
        model.main.code_embed, model.main.layer_embed, model.main.head, model.proprio_projector])
    _preflight(model, args, world, lora)
    layer_weights = parse_layer_weights(args.layer_weights)
    if layer_weights is not None and len(layer_weights) != tokenizer.num_layers:
        raise SystemExit(f"error: --layer-weights has {len(layer_weights)} values, the RFSQ tokenizer has "
                         f"{tokenizer.num_layers} layers")
    lw = None if layer_weights is None else torch.tensor(layer_weights, device=args.device)
    logger.info("main model: %.2fM parameters, %d train / %d held-out samples, %d steps",
                sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, len(train), len(held),
                args.steps)

    def batch_loss(batch: training.Batch) -> tuple[torch.Tensor, dict[str, float]]:
        j = batch.index
        pv = model.processor.preprocess_images(random_crop(train.images[j], CROP_AREA, batch.rng), False)
        wpv = None
        if cfg.use_wrist_image:  # its own random crop, as the third-person image gets
            wpv = model.processor.preprocess_images(random_crop(train.wrist_images[j], CROP_AREA, batch.rng), False)
            wpv = wpv.to(args.device)
        states = train.states[j] if cfg.use_proprio else None
        target = train_layers[j].to(args.device)
        loss, logits = model.training_loss(pv.to(args.device), [train.instruction(k) for k in j], target,
                                           states=states, wrist_pixel_values=wpv, layer_weights=lw)
        return loss, {"acc": float((logits.argmax(-1) == target).float().mean())}

    tcfg = training.TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
        weight_decay=args.weight_decay, betas=(0.9, 0.95), grad_clip=1.0, seed=args.seed,
        save_every=args.save_every, eval_every=args.eval_every, log_every=20, desc="main", ema_decay=args.ema,
        **scale.train_config_kwargs(args), **extra_share_kwargs(args.extra_share, len(expert_train), len(train)))
    result = training.fit(model, len(train), tcfg, batch_loss,
                          validate=(lambda: evaluate_main(model, held, held_layers, max_samples=512)) if len(held) else None,
                          checkpoint_dir=out / STATE_DIR, resume=args.resume,
                          meta={"stage": "main", "lora_r": lora.r, "precision": args.precision})
    step, history = result.step, [h for h in result.history if "heldout_loss" in h]
    scale.finish_model(model)  # LoRA merged into the backbone, fp32: the released format
    model.eval()
    if rank != 0:  # rank 0 evaluates and saves
        return {"steps": step, "rank": rank}
    metrics = evaluate_main(model, held, held_layers) if len(held) else {}
    metrics.update({"preset": None if args.init else args.preset, "layer_weights": layer_weights,
                    "steps": step, "train_seconds": round(result.seconds, 1), "train_samples": len(train),
                    "heldout_samples": len(held), "extra_samples": len(train) - len(expert_train),
                    "extra_share": args.extra_share, "history": history})
    if init_record is not None:
        metrics["init"] = init_record
    from models.openvla.tiny import save_pretrained

    save_pretrained(model.backbone, out, num_shards=2)
    model.save_rsd(out)
    (out / "rsd" / "train_main_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


@torch.no_grad()
def _distillation_set(model: OpenVLARSD, samples: DemoSamples, n: int, batch: int, seed: int):
    """(hidden_last, main greedy layers) for ``n`` samples: the draft's inputs and targets."""
    idx = np.sort(np.random.default_rng(seed).choice(len(samples), size=min(n, len(samples)), replace=False))
    hidden, targets = [], []
    for i in tqdm(range(0, len(idx), batch), desc="distill", dynamic_ncols=True, disable=None):
        j = idx[i:i + batch]
        embeds, mask = model.prefix(samples.images[j], [samples.instruction(k) for k in j],
                                    **_extra_inputs(model, samples, j))
        pre = model.main.prefill(embeds, mask)
        hidden.append(pre.hidden_last.float().cpu())
        targets.append(model.main.decode_greedy(embeds, mask).cpu())
    return torch.cat(hidden), torch.cat(targets), idx


def train_draft_stage(args: argparse.Namespace) -> dict:
    """Distil the draft from the frozen main model's greedy layers on demonstration frames; save it into the model.

    ``--kind deep`` (default): :class:`rsd.draft.DeepDraftModel` sized from the main model, proposing any
    remaining layers given the decided ones. ``--kind seed``: the fixed-k 3-layer draft (512-wide decoder).
    """
    from rsd.draft import (
        DeepDraftConfig,
        DeepDraftModel,
        DraftConfig,
        DraftTrainConfig,
        RFSQDraftModel,
        draft_width_for,
        evaluate_deep_draft,
        evaluate_draft,
        train_deep_draft,
        train_draft,
    )

    torch.manual_seed(args.seed)
    model = load_openvla_rsd(args.model, device=args.device, with_draft=False)
    samples = load_samples(args.demos, max_demos_per_task=args.max_demos_per_task)
    _check_inputs(model.cfg, samples, "draft")
    train, held = samples.split_by_demo(args.heldout_frac, args.seed)
    if not len(held):
        raise SystemExit("draft: no held-out demonstrations (raise --heldout-frac or add demonstrations)")
    train = add_extra_samples(train, args.extra_demos, samples.chunks.shape[1])
    h_train, t_train, j_train = _distillation_set(model, train, args.max_samples, 64, args.seed)
    h_held, t_held, _ = _distillation_set(model, held, max(256, args.max_samples // 8), 64, args.seed)
    tcfg = DraftTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            gt_weight=args.gt_weight, warmup_steps=min(200, args.steps // 10),
                            log_every=max(1, args.steps // 10))
    report: dict = {"kind": args.kind, "train_samples": int(len(h_train)), "heldout_samples": int(len(h_held)),
                    "steps": args.steps}
    if args.kind == "deep":
        width = args.width or draft_width_for(model.hidden_size)
        cfg = DeepDraftConfig(input_dim=model.hidden_size, hidden_dim=width, num_layers=model.main.num_layers,
                              codes=model.main.codes_per_layer, levels=model.main.levels, num_blocks=args.blocks)
        draft = DeepDraftModel(cfg)
        weights = parse_layer_weights(args.layer_weights)
        train_deep_draft(draft, h_train, t_train, tcfg, val=(h_held, t_held), progress=True, layer_weights=weights)
        report |= {"width": width, "blocks": args.blocks, "parameters": draft.num_parameters(), "layer_weights": weights,
                   **evaluate_deep_draft(draft, h_held, t_held)}
    else:
        k = 3
        cfg_seed = DraftConfig(input_dim=model.hidden_size, num_coarse_layers=k, num_decoder_layers=args.draft_layers)
        draft = RFSQDraftModel.from_config(cfg_seed)
        gt = _tokens_for(train.subset(j_train), model.tokenizer)[:, :k]
        train_draft(draft, h_train, t_train[:, :k], tcfg, gt_targets=gt, val=(h_held, t_held[:, :k]), progress=True)
        metrics = evaluate_draft(draft, h_held, t_held[:, :k])
        report |= {
            "heldout_code_accuracy_per_layer": metrics.code_accuracy,
            "heldout_layer_agreement_per_layer": metrics.layer_agreement,
            "heldout_mean_code_accuracy": metrics.mean_code_accuracy,
        }
    # Stored in float16 when asked (the shipped default keeps the repository small); loading casts it back.
    model.draft = (draft.half() if args.save_dtype == "float16" else draft).eval()
    model.save_rsd(args.model)
    (Path(args.model) / "rsd" / "train_draft_metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rsd.train_vla", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--demos", required=True, help="glob of LIBERO-layout HDF5 files with images")
    common.add_argument("--extra-demos", default=None,
                        help="glob of more episodes for the training split only (never held out, not in the "
                             "statistics): DAgger episodes written by run_libero_eval.sh --expert-labels")
    common.add_argument("--device", default="cpu")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    common.add_argument("--heldout-frac", type=float, default=0.1)
    common.add_argument("--max-demos-per-task", type=int, default=None)
    m = sub.add_parser("main", parents=[common])
    m.add_argument("--rfsq", required=True, help="trained RFSQ tokenizer directory")
    m.add_argument("--out", required=True)
    m.add_argument("--init", default=None,
                   help="released-format OpenVLA directory to fine-tune, or a released OpenVLA-OFT one (detected "
                        "by its action_head--*_checkpoint file: its backbone, and with --proprio its proprio "
                        "projector, initialise the RSD model; pass --wrist too, OFT uses both cameras), or an "
                        "OpenVLA-RSD one (detected by rsd/rsd_config.json: its layer head and proprio projector "
                        "continue too; needs --rfsq INIT/rsd/rfsq)")
    m.add_argument("--patch-size", type=int, default=0,
                   help="re-grid the --init backbone's vision towers to N-pixel patches before training "
                        "(models/openvla/repatch.py; e.g. 8 on the shipped 14-pixel checkpoint: 14x14 patches "
                        "per 112 px camera instead of 8x8); 0 keeps the checkpoint's")
    m.add_argument("--preset", default="tiny", choices=PRESETS, help="fresh backbone preset when --init is not given")
    m.add_argument("--layer-weights", default="",
                   help="cross-entropy weight per RFSQ layer, comma-separated ('' = equal). Coarse layers move the "
                        "action most: the shipped recipe uses 8,4,4,2,1,0.5,0.5,0.5")
    m.add_argument("--steps", type=int, default=3000)
    m.add_argument("--batch-size", type=int, default=32)
    m.add_argument("--lr", type=float, default=3e-4)
    m.add_argument("--weight-decay", type=float, default=0.01)
    m.add_argument("--warmup", type=int, default=200)
    m.add_argument("--save-every", type=int, default=250)
    m.add_argument("--eval-every", type=int, default=0)
    m.add_argument("--unnorm-key", default="libero_spatial_no_noops")
    m.add_argument("--resume", action="store_true")
    m.add_argument("--ema", type=float, default=0.0,
                   help="EMA decay of the weights that are validated and saved (0 = last iterate; e.g. 0.999)")
    m.add_argument("--proprio", action="store_true",
                   help="feed the normalised 8-D state (obs/state_8d) as one projected prefix token (OpenVLA-OFT)")
    m.add_argument("--wrist", action="store_true",
                   help="feed the wrist camera (obs/eye_in_hand_rgb) through the same vision towers (OpenVLA-OFT)")
    add_extra_share_argument(m)
    scale.add_scale_arguments(m)
    d = sub.add_parser("draft", parents=[common])
    d.add_argument("--model", required=True, help="OpenVLA-RSD directory from the main stage (draft saved into it)")
    d.add_argument("--steps", type=int, default=3000)
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--lr", type=float, default=5e-4)
    d.add_argument("--gt-weight", type=float, default=0.0)
    d.add_argument("--kind", default="deep", choices=["deep", "seed"],
                   help="deep: proposes any remaining layers (default); seed: the fixed-k 3-layer draft")
    d.add_argument("--width", type=int, default=0, help="deep draft width (0 = sized from the main model)")
    d.add_argument("--blocks", type=int, default=1, help="deep draft residual MLP blocks")
    d.add_argument("--layer-weights", default="0,4,4,2,1,0.5,0.5,0.5",
                   help="deep draft: cross-entropy weight per RFSQ layer (comma-separated; '' = equal). Default: "
                        "the layers whose wrong codes move the action most (1-3 on the shipped model) weigh most")
    d.add_argument("--draft-layers", type=int, default=2, help="seed draft: decoder blocks")
    d.add_argument("--max-samples", type=int, default=20000)
    d.add_argument("--save-dtype", default="float32", choices=["float32", "float16"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train_main(args) if args.stage == "main" else train_draft_stage(args)
    if scale.is_main_process():
        print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
