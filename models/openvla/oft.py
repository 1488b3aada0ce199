"""OpenVLA-OFT (Kim et al. 2025) on the project's OpenVLA backbone: parallel decoding + L1-regression head.

Released layout (``moojink/openvla-7b-oft-finetuned-libero-*``; facts and sources in ``docs/openvla_oft.md``)::

    config.json, model-*.safetensors (+ index), dataset_statistics.json, tokenizer files   <- merged backbone
    action_head--<step>_checkpoint.pt          <- L1RegressionActionHead state dict (keys ``module.model.*``)
    proprio_projector--<step>_checkpoint.pt    <- ProprioProjector state dict (keys ``module.fc{1,2}.*``)

``.safetensors`` files with the same stems are accepted instead of the ``.pt`` ones. ``.pt`` files are read only
with ``torch.load(weights_only=True)`` after a size check, so a pickle carrying code is refused.

One forward pass predicts a whole chunk: the prompt (BOS, prompt, lone ``▁``) is followed by
``chunk * action_dim`` placeholder tokens whose input embeddings are zero and one stop token (``</s>``, id 2).
The projected patches of every camera and the proprio token go right after BOS. The LLM attends fully
bidirectionally (only padding is masked, as upstream's patched Llama SDPA attention does). The final-layer hidden
states from the last prompt token up to the second-to-last placeholder (upstream's slice, one position before each
action slot) are reshaped to ``[B, chunk, action_dim * llm_dim]`` and mapped by the head to normalised actions,
which are unnormalised with the checkpoint's ``bounds_q99`` statistics.

CLI (a tiny same-architecture directory for tests): ``python -m models.openvla.oft --out DIR [--seed S]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.common.errors import CheckpointError
from models.openvla.modeling import OpenVLAForActionPrediction

logger = logging.getLogger(__name__)

#: LIBERO constants of upstream ``prismatic/vla/constants.py``.
NUM_ACTIONS_CHUNK = 8
ACTION_DIM = 7
PROPRIO_DIM = 8
STOP_TOKEN_ID = 2  # Llama-2 ``</s>``, appended after the placeholders
NUM_IMAGES_IN_INPUT = 2  # third-person + wrist camera (the LIBERO fine-tunes)
HEAD_BLOCKS = 2
ACTION_HEAD = "action_head"
PROPRIO_PROJECTOR = "proprio_projector"
#: A released head file is ~0.3 GB (bf16); anything far larger is not one of these files.
MAX_COMPONENT_BYTES = 4 << 30
NORM_EPS = 1e-8  # upstream adds it to (q99 - q01) in both directions


# ---------------------------------------------------------------------------------------------- modules
class MLPResNetBlock(nn.Module):
    """Pre-LayerNorm residual MLP block: ``x + ReLU(Linear(LayerNorm(x)))`` (``ffn.0`` norm, ``ffn.1`` Linear)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList(MLPResNetBlock(hidden_dim) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionActionHead(nn.Module):
    """Hidden states of the ``chunk * action_dim`` action slots -> ``[B, chunk, action_dim]`` normalised actions."""

    def __init__(self, llm_dim: int, action_dim: int = ACTION_DIM, num_blocks: int = HEAD_BLOCKS) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.model = MLPResNet(num_blocks, llm_dim * action_dim, llm_dim, action_dim)

    def forward(self, action_hidden: torch.Tensor, chunk: int) -> torch.Tensor:
        b = action_hidden.shape[0]
        return self.model(action_hidden.reshape(b, chunk, -1))


class ProprioProjector(nn.Module):
    """Normalised robot state -> one LLM input embedding: ``fc2(GELU(fc1(s)))``."""

    def __init__(self, llm_dim: int, proprio_dim: int = PROPRIO_DIM) -> None:
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim, bias=True)
        self.fc2 = nn.Linear(llm_dim, llm_dim, bias=True)
        self.act_fn1 = nn.GELU()

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn1(self.fc1(proprio)))


# ---------------------------------------------------------------------------------------------- statistics
def _bounds(stats: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q01 = np.asarray(stats["q01"], dtype=np.float64)
    q99 = np.asarray(stats["q99"], dtype=np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
    return q01, q99, mask


def normalize_proprio(state: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """Upstream ``bounds_q99``: ``2 (s - q01) / (q99 - q01 + eps) - 1`` where ``mask``, then clipped to [-1, 1]."""
    q01, q99, mask = _bounds(stats)
    s = np.asarray(state, dtype=np.float64)
    return np.clip(np.where(mask, 2.0 * (s - q01) / (q99 - q01 + NORM_EPS) - 1.0, s), -1.0, 1.0)


def unnormalize_actions(normalized: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """Upstream ``bounds_q99``: ``0.5 (a + 1) (q99 - q01 + eps) + q01`` where ``mask``; other dims pass through."""
    q01, q99, mask = _bounds(stats)
    a = np.asarray(normalized, dtype=np.float64)
    return np.where(mask, 0.5 * (a + 1.0) * (q99 - q01 + NORM_EPS) + q01, a)


# ---------------------------------------------------------------------------------------------- the model
class OpenVLAOFT(nn.Module):
    """``vla`` (the Prismatic backbone) + ``action_head`` + optional ``proprio_projector``."""

    #: Submodules the DuQuant dry run reports as kept in floating point when the selection leaves them out.
    DRYRUN_REPORT_PREFIXES = (ACTION_HEAD + ".", PROPRIO_PROJECTOR + ".")

    def __init__(self, vla: OpenVLAForActionPrediction, action_head: L1RegressionActionHead,
                 proprio_projector: ProprioProjector | None, num_images: int = NUM_IMAGES_IN_INPUT,
                 chunk: int = NUM_ACTIONS_CHUNK) -> None:
        super().__init__()
        if num_images < 1:
            raise ValueError("num_images must be >= 1")
        self.vla = vla
        self.action_head = action_head
        self.proprio_projector = proprio_projector
        self.num_images = num_images
        self.chunk = chunk

    @property
    def action_dim(self) -> int:
        return self.action_head.action_dim

    @property
    def proprio_dim(self) -> int | None:
        return None if self.proprio_projector is None else self.proprio_projector.fc1.in_features

    @property
    def norm_stats(self) -> dict[str, Any]:
        return self.vla.norm_stats

    @property
    def processor(self) -> Any:
        return self.vla.processor

    @property
    def input_keys(self) -> list[str]:
        return (["image"] + (["wrist_image"] if self.num_images > 1 else [])
                + (["state"] if self.proprio_projector is not None else []) + ["instruction"])

    def resolve_unnorm_key(self, unnorm_key: str | None) -> str:
        """The checkpoint's key; like upstream's LIBERO harness, ``libero_spatial`` finds ``libero_spatial_no_noops``."""
        if unnorm_key is not None and unnorm_key not in self.norm_stats and f"{unnorm_key}_no_noops" in self.norm_stats:
            unnorm_key = f"{unnorm_key}_no_noops"
        return self.vla.resolve_unnorm_key(unnorm_key)

    def build_inputs(self, pixel_values: list[torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     proprio: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Embeddings, 2-D padding mask, position ids and the index of the first action hidden state.

        ``input_ids`` are left-padded prompts (BOS ... ``▁``); placeholders and the stop token are appended here.
        """
        b = input_ids.shape[0]
        n_act = self.chunk * self.action_dim
        device = input_ids.device
        ids = torch.cat([input_ids, torch.ones(b, n_act, dtype=input_ids.dtype, device=device),
                         torch.full((b, 1), STOP_TOKEN_ID, dtype=input_ids.dtype, device=device)], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(b, n_act + 1)], dim=1)
        if len(pixel_values) != self.num_images:
            raise ValueError(f"this OFT model takes {self.num_images} image(s) per sample, got {len(pixel_values)}")
        patches = torch.cat([self.vla.project_patches(pv.to(device)) for pv in pixel_values], dim=1)
        if self.proprio_projector is not None:
            if proprio is None:
                raise ValueError("this OFT model uses proprio: pass the normalised state")
            dtype = self.proprio_projector.fc1.weight.dtype
            token = self.proprio_projector(proprio.to(device=device, dtype=dtype).reshape(b, -1))
            patches = torch.cat([patches, token[:, None].to(patches.dtype)], dim=1)
        tok = self.vla.language_model.get_input_embeddings()(ids).to(patches.dtype)
        start = input_ids.shape[1]
        tok[:, start:start + n_act] = 0.0  # the action slots carry no input (upstream zeroes their embeddings)
        rows, masks = [], []
        for i in range(b):
            p = int((attention_mask[i] == 0).sum())  # left padding: BOS at index p
            rows.append(torch.cat([tok[i, : p + 1], patches[i], tok[i, p + 1 :]], dim=0))
            masks.append(torch.cat([mask[i, : p + 1], mask.new_ones(patches.shape[1]), mask[i, p + 1 :]], dim=0))
        embeds, full_mask = torch.stack(rows), torch.stack(masks)
        first = embeds.shape[1] - 1 - n_act - 1  # one position before the first action slot
        return embeds, full_mask, self.vla.position_ids_from_mask(full_mask), first

    @staticmethod
    def bidirectional_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[B, L]`` padding mask -> additive ``[B, 1, L, L]``: every query sees every non-padding key."""
        cols = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        cols = cols.masked_fill(mask == 0, torch.finfo(dtype).min)
        return cols[:, None, None, :].expand(-1, 1, mask.shape[1], -1)

    @torch.no_grad()
    def predict_normalized(self, pixel_values: list[torch.Tensor], input_ids: torch.Tensor,
                           attention_mask: torch.Tensor, proprio: torch.Tensor | None = None) -> torch.Tensor:
        """One LLM forward pass -> ``[B, chunk, action_dim]`` normalised actions (float32)."""
        embeds, mask, pos, first = self.build_inputs(pixel_values, input_ids, attention_mask, proprio)
        out = self.vla.language_model.model(inputs_embeds=embeds, position_ids=pos,
                                            attention_mask=self.bidirectional_mask(mask, embeds.dtype))
        hidden = out.last_hidden_state[:, first:first + self.chunk * self.action_dim]
        head_dtype = self.action_head.model.fc1.weight.dtype
        return self.action_head(hidden.to(head_dtype), self.chunk).float()

    @torch.no_grad()
    def predict_action(self, images: list[Any], instruction: str | list[str], states: Any = None,
                       unnorm_key: str | None = None, center_crop: bool = True) -> np.ndarray:
        """Raw uint8 images (one array or list per camera, third-person first), instructions, raw states ->
        unnormalised ``[B, chunk, action_dim]`` (``[chunk, action_dim]`` for a single instruction string)."""
        if self.processor is None:
            raise RuntimeError("no processor attached (load the model with models.openvla.oft.load)")
        single = isinstance(instruction, str)
        instr = [instruction] if single else list(instruction)
        key = self.resolve_unnorm_key(unnorm_key)
        device = next(self.parameters()).device
        pvs = [self.processor.preprocess_images(cam, center_crop) for cam in images[: self.num_images]]
        input_ids, attention_mask = self.processor.tokenize([_prompt(i) for i in instr])
        proprio = None
        if self.proprio_projector is not None:
            if states is None:
                raise ValueError("this OFT model uses proprio: pass states [B, proprio_dim]")
            s = np.asarray(states, dtype=np.float64).reshape(len(instr), -1)
            proprio = torch.from_numpy(normalize_proprio(s, self.norm_stats[key]["proprio"])).float()
        norm = self.predict_normalized(pvs, input_ids.to(device), attention_mask.to(device), proprio)
        actions = unnormalize_actions(norm.cpu().numpy(), self.norm_stats[key]["action"])
        return actions[0] if single else actions


def _prompt(instruction: str) -> str:
    from models.openvla.processing import build_prompt

    return build_prompt(instruction)


# ---------------------------------------------------------------------------------------------- head files
_COMPONENT_RE = r"^{name}--.+_checkpoint\.(?:pt|safetensors)$"


def find_component(root: Path, name: str, required: bool = True) -> Path | None:
    """The one ``<name>--<step>_checkpoint.{pt,safetensors}`` in ``root`` (a ``.safetensors`` twin wins)."""
    pat = re.compile(_COMPONENT_RE.format(name=re.escape(name)))
    found = sorted(p for p in root.iterdir() if pat.match(p.name))
    stems = {p.with_suffix("") for p in found}
    if len(stems) > 1:
        raise CheckpointError(f"{root}: several {name} checkpoints ({', '.join(p.name for p in found)}); keep one")
    if not found:
        if required:
            raise CheckpointError(f"{root}: no {name}--<step>_checkpoint.pt (or .safetensors) file")
        return None
    return next((p for p in found if p.suffix == ".safetensors"), found[0])


def is_oft_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an OFT checkpoint in the released layout: a backbone ``config.json`` with an
    ``action_head--<step>_checkpoint`` file beside it (what :func:`load` requires). A plain OpenVLA directory has
    no such file, so callers that accept both (``rsd.train_vla main --init``) can tell them apart by layout."""
    root = Path(path)
    return (root / "config.json").is_file() and find_component(root, ACTION_HEAD, required=False) is not None


def read_component(path: Path) -> dict[str, torch.Tensor]:
    """A head file's tensors with the DDP ``module.`` prefix stripped; a non-tensor pickle is refused."""
    size = path.stat().st_size
    if size == 0 or size > MAX_COMPONENT_BYTES:
        raise CheckpointError(f"{path}: {size} bytes is not a plausible head checkpoint (limit "
                              f"{MAX_COMPONENT_BYTES} bytes)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - any parse failure is one clear checkpoint error
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    else:
        try:
            sd = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - UnpicklingError for code-carrying pickles, anything else too
            raise CheckpointError(f"{path}: refused by weights-only loading (a state dict of tensors is expected; "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_component(module: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    """Strict load: the same key set and shapes as ``module``, else a CheckpointError naming ``path``."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        raise CheckpointError(f"{path}: keys do not match the architecture (missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]})")
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {shape}")
    module.load_state_dict(sd, strict=True, assign=any(p.is_meta for p in module.parameters()))


def _head_from_state(sd: dict[str, torch.Tensor], llm_dim: int, path: Path) -> L1RegressionActionHead:
    if "model.fc1.weight" not in sd or "model.fc2.weight" not in sd:
        raise CheckpointError(f"{path}: no model.fc1.weight / model.fc2.weight: not an L1 regression action head")
    action_dim = int(sd["model.fc2.weight"].shape[0])
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"model\.mlp_resnet_blocks\.(\d+)\.", k))}
    return L1RegressionActionHead(llm_dim, action_dim, num_blocks=len(blocks))


def _proprio_from_state(sd: dict[str, torch.Tensor], llm_dim: int, path: Path) -> ProprioProjector:
    if "fc1.weight" not in sd:
        raise CheckpointError(f"{path}: no fc1.weight: not a proprio projector")
    return ProprioProjector(llm_dim, int(sd["fc1.weight"].shape[1]))


def load(path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         num_images: int = NUM_IMAGES_IN_INPUT, chunk: int = NUM_ACTIONS_CHUNK) -> OpenVLAOFT:
    """Backbone through :func:`models.openvla.loading.load`, then the head files (strict, weights only)."""
    from models.openvla.loading import load as load_backbone

    root = Path(path)
    vla = load_backbone(root, device="cpu", dtype=dtype)
    llm_dim = vla.language_model.config.hidden_size
    head_path = find_component(root, ACTION_HEAD)
    assert head_path is not None
    head_sd = read_component(head_path)
    head = _head_from_state(head_sd, llm_dim, head_path)
    load_component(head, head_sd, head_path)
    proprio = None
    proprio_path = find_component(root, PROPRIO_PROJECTOR, required=False)
    if proprio_path is not None:
        proprio_sd = read_component(proprio_path)
        proprio = _proprio_from_state(proprio_sd, llm_dim, proprio_path)
        load_component(proprio, proprio_sd, proprio_path)
    else:
        logger.warning("%s: no proprio_projector checkpoint: the state is not an input", root)
    model = OpenVLAOFT(vla, head, proprio, num_images=num_images, chunk=chunk)
    for key, stats in vla.norm_stats.items():
        dim = len(stats.get("action", {}).get("q01", [])) or head.action_dim
        if dim != head.action_dim:
            raise CheckpointError(f"{root}/dataset_statistics.json: {key} has {dim}-D actions, the head "
                                  f"{head_path.name} predicts {head.action_dim}")
    return model.to(device=device, dtype=dtype).eval()


def build_empty(path: str | os.PathLike[str]) -> OpenVLAOFT:
    """The architecture on ``meta`` from config.json (LIBERO head sizes; for the DuQuant dry run)."""
    from models.common.loading import init_empty_weights
    from models.openvla.loading import build_empty as build_backbone

    root = Path(path)
    vla = build_backbone(root)
    llm_dim = vla.config.llama_config().hidden_size
    stats = next(iter(vla.norm_stats.values()), {}) if vla.norm_stats else {}
    action_dim = len(stats.get("action", {}).get("q01", [])) or ACTION_DIM
    has_proprio = root.is_dir() and find_component(root, PROPRIO_PROJECTOR, required=False) is not None
    with init_empty_weights():
        head = L1RegressionActionHead(llm_dim, action_dim)
        proprio = ProprioProjector(llm_dim, PROPRIO_DIM) if has_proprio else None
    return OpenVLAOFT(vla, head, proprio)


# ---------------------------------------------------------------------------------------------- tiny directory
def oft_norm_stats(key: str = "libero_spatial_no_noops") -> dict[str, Any]:
    """LIBERO-like statistics with a non-degenerate proprio range (the gripper action is not normalised)."""
    from models.openvla.tiny import libero_like_norm_stats

    stats = libero_like_norm_stats()["libero_spatial_no_noops"]
    stats["proprio"] = {
        "mean": [-0.05, 0.03, 1.0, 3.0, -0.1, 0.0, 0.02, -0.02],
        "std": [0.1, 0.15, 0.1, 0.3, 0.6, 0.3, 0.01, 0.01],
        "q01": [-0.3, -0.3, 0.9, 2.0, -1.5, -0.8, 0.001, -0.04],
        "q99": [0.15, 0.35, 1.3, 3.3, 1.2, 0.6, 0.04, -0.001],
        "min": [-0.4, -0.4, 0.8, 1.9, -1.8, -1.0, 0.0, -0.045],
        "max": [0.2, 0.4, 1.4, 3.4, 1.5, 0.8, 0.045, 0.0],
    }
    return {key: stats}


def build_tiny_dir(out: str | os.PathLike[str], seed: int = 0, step: int = 150000,
                   fmt: str = "pt", with_proprio: bool = True) -> Path:
    """A tiny OFT directory in the released layout: the tiny backbone's files plus ``action_head--<step>_
    checkpoint.pt`` and ``proprio_projector--<step>_checkpoint.pt`` saved as upstream does (DDP ``module.`` keys).
    ``fmt="safetensors"`` writes ``.safetensors`` twins instead."""
    from models.openvla.tiny import build_tiny, save_pretrained

    out = Path(out)
    vla = build_tiny(seed=seed)
    vla.norm_stats = oft_norm_stats()
    save_pretrained(vla, out)
    llm_dim = vla.language_model.config.hidden_size
    torch.manual_seed(seed + 1)
    parts: dict[str, nn.Module] = {ACTION_HEAD: L1RegressionActionHead(llm_dim)}
    if with_proprio:
        parts[PROPRIO_PROJECTOR] = ProprioProjector(llm_dim)
    for name, module in parts.items():
        sd = {f"module.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items()}
        target = out / f"{name}--{step}_checkpoint.{fmt}"
        if fmt == "pt":
            torch.save(sd, target)
        elif fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(target))
        else:
            raise ValueError(f"fmt must be 'pt' or 'safetensors', got {fmt!r}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a tiny OpenVLA-OFT checkpoint directory (released layout).")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", default="pt", choices=["pt", "safetensors"])
    args = ap.parse_args(argv)
    out = build_tiny_dir(args.out, args.seed, fmt=args.format)
    print(json.dumps({"out": str(out), "files": sorted(p.name for p in out.iterdir())}))


if __name__ == "__main__":
    main()
