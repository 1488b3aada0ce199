"""Draft models of RSD (the fixed-k draft and the deep draft) and their training helpers.

The draft maps the backbone's last hidden state (4096-d for OpenVLA-7B) to logits for the first ``k = 3`` RFSQ
layers in one cheap pass: Linear projection -> 512 -> small transformer decoder -> 3 classification heads
(Linear 512->256, GELU, LayerNorm, Linear 256->896) -> ``[B, 3, 128, 7]``.

Decoder depth: the decoder runs on a single token, where self-attention degenerates to a fixed linear map (a
softmax over one key is 1), so each block is effectively a linear + FFN residual block; depth only buys
non-linearity. We default to 2 blocks: 9.5 M parameters in all at 4096 -> 512 (2.1 M projection, 6.3 M in the
two blocks, 1.1 M heads; 1 block: 6.3 M, 4 blocks: 15.8 M), about 19 MFLOP per sample against about 13 GFLOP for
one 7B decoding step, so the draft stays negligible in FLOPs and weight traffic, while two GELU FFN blocks give
enough non-linearity to imitate a few layers of the main model from its hidden state. ``num_decoder_layers`` is
configurable and saved with the weights.

Training: "all 128 codes equal" is a strict bar (0.99 per-code agreement gives ~28 % layer
acceptance), so the draft is trained to imitate the *main model's own greedy tokens* (distillation), optionally
mixed with ground-truth cross-entropy and a soft KL to main's distribution (which is what sampling-mode acceptance
rewards). We report per-layer per-code accuracy and per-layer whole-layer agreement.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models.common import training

logger = logging.getLogger(__name__)

CONFIG_NAME = "draft_config.json"
MAX_SHARD_BYTES = 4 * 1024 * 1024  # keep every shipped file small
WEIGHTS_NAME = "draft.safetensors"


@dataclass
class DraftConfig:
    """Shape of an :class:`RFSQDraftModel` (saved next to the weights as JSON)."""

    input_dim: int = 4096
    hidden_dim: int = 512
    num_coarse_layers: int = 3
    chunk_len: int = 8
    action_hidden_dim: int = 16
    grid_size: int = 7
    num_heads: int = 8
    feedforward_dim: int = 2048
    num_decoder_layers: int = 2
    dropout: float = 0.0
    condition_on_layer0: bool = False


class DraftTransformerDecoder(nn.Module):
    """The fixed-k draft's small transformer decoder: pre-norm self-attention blocks (causal; here over one token)."""

    def __init__(self, hidden_dim: int, num_heads: int, feedforward_dim: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.TransformerEncoderLayer(
                    d_model=hidden_dim,
                    nhead=num_heads,
                    dim_feedforward=feedforward_dim,
                    dropout=dropout,
                    activation="gelu",
                    batch_first=True,
                    norm_first=True,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm = nn.LayerNorm(hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, S, D] -> [B, S, D]`` with a causal mask (the fixed-k draft feeds S = 1)."""
        s = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(s, device=x.device, dtype=x.dtype) if s > 1 else None
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=s > 1)
        return self.norm(x)


class RFSQDraftModel(nn.Module):
    """Seed draft: backbone hidden ``[B, input_dim]`` -> logits ``[B, num_coarse_layers, chunk*dim, grid]``."""

    def __init__(
        self,
        input_dim: int = 4096,
        hidden_dim: int = 512,
        num_coarse_layers: int = 3,
        chunk_len: int = 8,
        action_hidden_dim: int = 16,
        grid_size: int = 7,
        num_heads: int = 8,
        feedforward_dim: int = 2048,
        num_decoder_layers: int = 2,
        dropout: float = 0.0,
        condition_on_layer0: bool = False,
    ) -> None:
        super().__init__()
        self.config = DraftConfig(
            input_dim=input_dim,
            hidden_dim=hidden_dim,
            num_coarse_layers=num_coarse_layers,
            chunk_len=chunk_len,
            action_hidden_dim=action_hidden_dim,
            grid_size=grid_size,
            num_heads=num_heads,
            feedforward_dim=feedforward_dim,
            num_decoder_layers=num_decoder_layers,
            dropout=dropout,
            condition_on_layer0=condition_on_layer0,
        )
        self.codes = chunk_len * action_hidden_dim
        self.grid_size = grid_size
        self.num_coarse_layers = num_coarse_layers
        self.input_projection = nn.Linear(input_dim, hidden_dim)
        # Layer-0-conditioned variant: main's layer 0 is free from the prefill, so a draft that proposes layers
        # 1..k given layer 0 saves one more pass; layer 0 enters as a sum of per-(code, level) embeddings
        self.first_layer = 1 if condition_on_layer0 else 0
        self.layer0_embed = nn.Embedding(self.codes * grid_size, hidden_dim) if condition_on_layer0 else None
        if self.layer0_embed is not None:
            nn.init.normal_(self.layer0_embed.weight, std=1.0 / self.codes**0.5)
            self.register_buffer("_code_offsets", torch.arange(self.codes) * grid_size, persistent=False)
        self.decoder = DraftTransformerDecoder(hidden_dim, num_heads, feedforward_dim, num_decoder_layers, dropout)
        self.classification_heads = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Linear(hidden_dim, hidden_dim // 2),
                    nn.GELU(),
                    nn.LayerNorm(hidden_dim // 2),
                    nn.Linear(hidden_dim // 2, self.codes * grid_size),
                )
                for _ in range(num_coarse_layers)
            ]
        )

    @classmethod
    def from_config(cls, cfg: DraftConfig) -> RFSQDraftModel:
        return cls(**asdict(cfg))

    def forward(self, hidden: Tensor, layer0: Tensor | None = None) -> Tensor:
        """``[B, input_dim]`` (backbone last hidden state) -> ``[B, k, codes, grid]`` float32 logits.

        Logits are for layers ``first_layer .. first_layer + k - 1``; a layer-0-conditioned draft also needs
        ``layer0`` ``[B, codes]`` (main's decided layer 0).
        """
        x = self.input_projection(hidden.to(self.input_projection.weight.dtype))
        if self.layer0_embed is not None:
            if layer0 is None:
                raise ValueError("this draft proposes layers 1..k and needs layer0 tokens [B, codes]")
            x = x + self.layer0_embed(layer0.long() + self._code_offsets).sum(dim=-2)
        x = self.decoder(x.unsqueeze(1)).squeeze(1)
        out = [head(x).view(-1, self.codes, self.grid_size) for head in self.classification_heads]
        return torch.stack(out, dim=1).float()

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write the weights + ``draft_config.json`` into ``directory``.

        Small drafts go in one ``draft.safetensors``; larger ones use the project's released-checkpoint
        sharding (``model-0000K-of-0000N.safetensors`` + index, shards of at most ``MAX_SHARD_BYTES``), the
        same mechanism the backbone uses, so no single shipped file grows past a few MB.
        """
        return _save_draft(self, directory, CONFIG_NAME, asdict(self.config), "rsd-draft")

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> RFSQDraftModel:
        """Load a draft saved by :meth:`save`, single-file or sharded (safetensors only; no pickle)."""
        d = Path(directory)
        cfg = DraftConfig(**json.loads((d / CONFIG_NAME).read_text()))
        model = cls.from_config(cfg)
        state = _load_weights(d, device)
        model.load_state_dict(state)
        return model.to(device).eval()


# ---------------------------------------------------------------------- deep draft
DEEP_CONFIG_NAME = "deep_draft_config.json"


def draft_width_for(main_hidden: int) -> int:
    """Width of a deep draft sized from its main model: an eighth of the main width, at least 128.

    Why an eighth: the draft's cost must be a small fraction of one main decoding step. For a 4096-wide 7B
    that is the fixed-k draft's 512 (about 2 % of a step's weight traffic); for the shipped 128-wide tiny model the
    floor of 128 keeps enough capacity, and its cost (~0.1 ms on one CPU thread) is set by per-op overhead,
    not FLOPs.
    """
    return max(128, int(main_hidden) // 8)


@dataclass
class DeepDraftConfig:
    """Shape of a :class:`DeepDraftModel` (saved as ``deep_draft_config.json``)."""

    input_dim: int = 4096
    hidden_dim: int = 512
    num_layers: int = 8  # RFSQ layers L
    codes: int = 128  # codes per layer (chunk_len x latent_dim)
    levels: int = 7
    num_blocks: int = 1
    mlp_ratio: int = 2
    kind: str = "deep"


class DeepDraftModel(nn.Module):
    """A draft that proposes *any* remaining RFSQ layers ``m .. L-1`` given the decided layers ``0 .. m-1``.

    Input: the main model's last prefix hidden state ``h`` (what main used for layer 0) and the decided layers
    (at least main's free layer 0), each entering as a sum of per-(layer, code, level) embeddings, plus an
    embedding of ``m``. One residual MLP block, then one output matrix whose rows for layers ``m..m+n-1`` are
    the only ones computed. So the same weights serve the first speculation round (m = 1) and every round after
    a rejection (the decided prefix grows), which is what lets speculation continue instead of falling back to
    one main step per layer. Trained by :func:`train_deep_draft` on main's own greedy layers with a random
    prefix length per sample.
    """

    first_layer = 1
    deep = True

    def __init__(self, cfg: DeepDraftConfig) -> None:
        super().__init__()
        self.config = cfg
        d, cv = cfg.hidden_dim, cfg.codes * cfg.levels
        self.num_layers, self.codes, self.levels = cfg.num_layers, cfg.codes, cfg.levels
        self.input_projection = nn.Linear(cfg.input_dim, d)
        self.prefix_embed = nn.Embedding(cfg.num_layers * cv, d)
        nn.init.normal_(self.prefix_embed.weight, std=1.0 / cfg.codes**0.5)
        self.depth_embed = nn.Embedding(cfg.num_layers, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(), nn.Linear(cfg.mlp_ratio * d, d))
            for _ in range(cfg.num_blocks)
        )
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, cfg.num_layers * cv)
        offsets = torch.arange(cfg.num_layers)[:, None] * cv + torch.arange(cfg.codes)[None] * cfg.levels
        self.register_buffer("_offsets", offsets, persistent=False)  # [L, C]

    def _features(self, hidden: Tensor, prefix: Tensor, depth: Tensor) -> Tensor:
        """``h [B, H]``, decided codes ``[B, L', C]`` (rows >= depth ignored), ``depth [B]`` -> ``[B, D]``."""
        x = self.input_projection(hidden.to(self.input_projection.weight.dtype))
        n = prefix.shape[1]
        emb = self.prefix_embed(prefix.long() + self._offsets[:n]).sum(dim=-2)  # [B, L', D]
        keep = torch.arange(n, device=prefix.device)[None] < depth[:, None]
        x = x + (emb * keep[..., None].to(emb.dtype)).sum(dim=1) + self.depth_embed(depth)
        for block in self.blocks:
            x = x + block(x)
        return self.norm(x)

    def forward(self, hidden: Tensor, prefix: Tensor, num: int | None = None) -> Tensor:
        """Logits ``[B, num, C, V]`` (float32) for layers ``m .. m+num-1`` where ``m = prefix.shape[1]``."""
        b, m = hidden.shape[0], prefix.shape[1]
        if not 1 <= m < self.num_layers:
            raise ValueError(f"a deep draft needs 1..{self.num_layers - 1} decided layers, got {m}")
        num = self.num_layers - m if num is None else min(int(num), self.num_layers - m)
        # inference: every given layer is decided, so one embedding_bag sums them (no mask, one op)
        x = self.input_projection(hidden.to(self.input_projection.weight.dtype))
        idx = (prefix.long() + self._offsets[:m]).reshape(b, -1)
        x = x + F.embedding_bag(idx, self.prefix_embed.weight, mode="sum") + self.depth_embed.weight[m]
        for block in self.blocks:
            x = x + block(x)
        x = self.norm(x)
        cv = self.codes * self.levels
        rows = slice(m * cv, (m + num) * cv)
        logits = F.linear(x, self.out.weight[rows], self.out.bias[rows])
        return logits.float().view(b, num, self.codes, self.levels)

    def all_logits(self, hidden: Tensor, layers: Tensor, depth: Tensor) -> Tensor:
        """Training view: logits for every layer ``[B, L, C, V]`` given per-sample prefix lengths ``depth``."""
        x = self._features(hidden, layers, depth)
        return self.out(x).float().view(-1, self.num_layers, self.codes, self.levels)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, directory: str | Path) -> Path:
        """Weights (project sharding above 4 MB, like :meth:`RFSQDraftModel.save`) + ``deep_draft_config.json``."""
        return _save_draft(self, directory, DEEP_CONFIG_NAME, asdict(self.config), "rsd-deep-draft")

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> DeepDraftModel:
        d = Path(directory)
        model = cls(DeepDraftConfig(**json.loads((d / DEEP_CONFIG_NAME).read_text())))
        model.load_state_dict(_load_weights(d, device))
        return model.to(device).eval()


def _save_draft(model: nn.Module, directory: str | Path, config_name: str, config: dict, kind: str) -> Path:
    """Weights in one file up to ``MAX_SHARD_BYTES``, else the project's checkpoint sharding, + the config JSON.

    Files of the other draft kind are removed first, so a directory always holds exactly one draft.
    """
    from models.common.safetensors_io import save_sharded

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for old in [*d.glob("model-*.safetensors"), d / "model.safetensors.index.json", d / WEIGHTS_NAME,
                d / CONFIG_NAME, d / DEEP_CONFIG_NAME]:
        old.unlink(missing_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    total = sum(v.numel() * v.element_size() for v in state.values())
    if total <= MAX_SHARD_BYTES:
        save_file(state, str(d / WEIGHTS_NAME), metadata={"format": "pt", "kind": kind})
    else:
        save_sharded(state, d, num_shards=-(-total // MAX_SHARD_BYTES), metadata={"kind": kind})
    (d / config_name).write_text(json.dumps(config, indent=2) + "\n")
    return d


def _load_weights(d: Path, device: str | torch.device) -> dict[str, Tensor]:
    if (d / WEIGHTS_NAME).is_file():
        return load_file(str(d / WEIGHTS_NAME), device=str(device))
    from models.common.safetensors_io import checkpoint_shards

    shards, _ = checkpoint_shards(d)
    state: dict[str, Tensor] = {}
    for shard in shards:
        state.update(load_file(str(shard), device=str(device)))
    return state


def load_draft(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load whichever draft ``directory`` holds: a deep draft or the fixed-k :class:`RFSQDraftModel`."""
    d = Path(directory)
    if (d / DEEP_CONFIG_NAME).is_file():
        return DeepDraftModel.load(d, device)
    return RFSQDraftModel.load(d, device)


# ---------------------------------------------------------------------- training
@dataclass
class DraftTrainConfig:
    """Optimiser settings (AdamW 1e-4, wd 1e-5, clip 1.0, cosine with warm-up)."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    warmup_steps: int = 100
    gt_weight: float = 0.0  # weight of ground-truth CE (distillation CE has weight 1 - gt_weight)
    kl_weight: float = 0.0  # soft KL(main || draft) on main's logits, if given
    seed: int = 0
    log_every: int = 100


@dataclass
class DraftMetrics:
    """Agreement of the draft's argmax with target tokens, per drafted layer."""

    loss: float
    code_accuracy: list[float] = field(default_factory=list)  # per layer: fraction of codes equal
    layer_agreement: list[float] = field(default_factory=list)  # per layer: fraction of whole layers equal

    @property
    def mean_code_accuracy(self) -> float:
        return float(sum(self.code_accuracy) / max(1, len(self.code_accuracy)))


def draft_loss(
    logits: Tensor,
    targets: Tensor,
    gt_targets: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    gt_weight: float = 0.0,
    kl_weight: float = 0.0,
) -> Tensor:
    """Cross-entropy to ``targets`` (main's greedy tokens), optionally mixed with ground-truth CE and soft KL."""
    v = logits.shape[-1]
    flat = logits.reshape(-1, v)
    loss = F.cross_entropy(flat, targets.reshape(-1).long())
    if gt_targets is not None and gt_weight > 0:
        loss = (1 - gt_weight) * loss + gt_weight * F.cross_entropy(flat, gt_targets.reshape(-1).long())
    if teacher_logits is not None and kl_weight > 0:
        logp = F.log_softmax(teacher_logits.reshape(-1, v).float(), dim=-1)
        logq = F.log_softmax(flat, dim=-1)
        loss = loss + kl_weight * F.kl_div(logq, logp, log_target=True, reduction="batchmean")
    return loss


@torch.no_grad()
def evaluate_draft(
    draft: nn.Module, hidden: Tensor, targets: Tensor, batch_size: int = 256, layer0: Tensor | None = None
) -> DraftMetrics:
    """Per-layer per-code accuracy and whole-layer agreement of ``draft`` on ``(hidden, targets [N, k, C])``.

    ``targets`` are the layers the draft proposes (``first_layer ..``); ``layer0`` feeds a layer-0-conditioned draft.
    """
    was_training = draft.training
    draft.eval()
    k = targets.shape[1]
    code_hits = torch.zeros(k, dtype=torch.float64)
    layer_hits = torch.zeros(k, dtype=torch.float64)
    loss_sum = 0.0
    n = hidden.shape[0]
    for i in range(0, n, batch_size):
        l0 = None if layer0 is None else layer0[i : i + batch_size]
        logits = draft(hidden[i : i + batch_size], l0)[:, :k]
        t = targets[i : i + batch_size].to(logits.device)
        loss_sum += float(draft_loss(logits, t)) * t.shape[0]
        eq = logits.argmax(-1) == t
        code_hits += eq.double().mean(-1).sum(0).cpu()
        layer_hits += eq.all(-1).double().sum(0).cpu()
    draft.train(was_training)
    return DraftMetrics(
        loss=loss_sum / n, code_accuracy=(code_hits / n).tolist(), layer_agreement=(layer_hits / n).tolist()
    )


@torch.no_grad()
def collect_distillation_data(
    main: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor | None = None, batch_size: int = 64
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the frozen main model greedily on prefixes -> ``(hidden_last [N, H], tokens [N, L, C], logits [N, L, C, V])``.

    ``tokens`` are main's own greedy layers (the distillation targets); ``logits`` are teacher-forced on them
    (soft targets for the KL option).
    """
    hs, toks, logs = [], [], []
    for i in range(0, inputs_embeds.shape[0], batch_size):
        x = inputs_embeds[i : i + batch_size]
        m = None if attention_mask is None else attention_mask[i : i + batch_size]
        pre = main.prefill(x, m)
        tokens = main.decode_greedy(x, m)
        _, logits = main(x, tokens, m)
        hs.append(pre.hidden_last.float())
        toks.append(tokens)
        logs.append(logits.float())
    return torch.cat(hs), torch.cat(toks), torch.cat(logs)


def train_draft(
    draft: RFSQDraftModel,
    hidden: Tensor,
    targets: Tensor,
    cfg: DraftTrainConfig,
    gt_targets: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    val: tuple[Tensor, Tensor] | None = None,
    progress: bool = False,
    layer0: Tensor | None = None,
    val_layer0: Tensor | None = None,
) -> list[dict[str, float]]:
    """Train ``draft`` on ``(hidden [N, H], targets [N, k, C])``; returns a history of logged metrics.

    ``targets`` should be the main model's own greedy tokens of layers ``0..k-1`` (distillation); ``gt_targets``
    (same shape) adds ground-truth CE with weight ``cfg.gt_weight``; ``teacher_logits`` ``[N, k, C, V]`` adds a
    soft KL with weight ``cfg.kl_weight``. A layer-0-conditioned draft (``first_layer == 1``) takes main's layer
    0 tokens ``layer0 [N, C]`` and ``targets`` are then layers ``1..k``. Seeded, so a run is reproducible.
    """
    device = next(draft.parameters()).device

    def batch_loss(batch: training.Batch) -> Tensor:
        idx = torch.from_numpy(batch.index)
        logits = draft(hidden[idx].to(device), None if layer0 is None else layer0[idx].to(device))
        k = logits.shape[1]
        return draft_loss(
            logits,
            targets[idx, :k].to(device),
            None if gt_targets is None else gt_targets[idx, :k].to(device),
            None if teacher_logits is None else teacher_logits[idx, :k].to(device),
            cfg.gt_weight,
            cfg.kl_weight,
        )

    def validate() -> dict[str, float]:
        m = evaluate_draft(draft, *val, layer0=val_layer0)
        return {"val_code_acc": m.mean_code_accuracy} | {f"val_layer{j}_agree": a for j, a in enumerate(m.layer_agreement)}

    result = training.fit(draft, hidden.shape[0], _fit_config(cfg, "draft", progress), batch_loss,
                          validate=None if val is None else validate)
    return result.history


def _fit_config(cfg: DraftTrainConfig, desc: str, progress: bool) -> training.TrainConfig:
    """Both draft kinds train with the shared loop; validation runs at every logged step."""
    return training.TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, seed=cfg.seed, log_every=cfg.log_every,
        eval_every=cfg.log_every, progress=progress, desc=desc)


def train_deep_draft(
    draft: DeepDraftModel,
    hidden: Tensor,
    layers: Tensor,
    cfg: DraftTrainConfig,
    val: tuple[Tensor, Tensor] | None = None,
    progress: bool = False,
    layer_weights: list[float] | None = None,
) -> list[dict[str, float]]:
    """Distil a :class:`DeepDraftModel` from main's greedy layers ``[N, L, C]`` and last hidden states ``[N, H]``.

    Each sample gets a random number m of decided layers (1..L-1): the draft sees layers ``0..m-1`` and is trained
    with cross-entropy on layers ``m..L-1`` -- the situation of any speculation round. ``layer_weights`` (one per
    layer) weight each layer's cross-entropy, e.g. by how far a wrong code of that layer moves the action.
    """
    device = next(draft.parameters()).device
    n_layers = draft.num_layers
    rows = torch.arange(n_layers)
    weights = torch.ones(n_layers) if layer_weights is None else torch.as_tensor(layer_weights, dtype=torch.float32)
    if weights.shape != (n_layers,):
        raise ValueError(f"layer_weights needs {n_layers} values, got {tuple(weights.shape)}")

    def batch_loss(batch: training.Batch) -> Tensor:
        idx = torch.from_numpy(batch.index)
        depth = torch.randint(1, n_layers, (idx.shape[0],), generator=batch.generator)
        lay = layers[idx].to(device)
        logits = draft.all_logits(hidden[idx].to(device), lay, depth.to(device))
        target_mask = ((rows[None] >= depth[:, None]) * weights[None]).to(device)  # [B, L]
        ce = F.cross_entropy(logits.reshape(-1, draft.levels), lay.reshape(-1).long(), reduction="none")
        ce = ce.view(idx.shape[0], n_layers, -1).mean(-1)
        return (ce * target_mask).sum() / target_mask.sum()

    def validate() -> dict[str, float]:
        m = evaluate_deep_draft(draft, *val)
        return {"val_round1_code_acc": sum(m["round1_code_accuracy"]) / len(m["round1_code_accuracy"])}

    result = training.fit(draft, hidden.shape[0], _fit_config(cfg, "deep draft", progress), batch_loss,
                          validate=None if val is None else validate)
    return result.history


@torch.no_grad()
def evaluate_deep_draft(draft: DeepDraftModel, hidden: Tensor, layers: Tensor, batch_size: int = 256) -> dict:
    """Per-layer agreement of a deep draft with main's greedy layers, in the two situations the engine meets.

    ``round1_*``: every layer 1..L-1 proposed at once from layer 0 (the first round); ``given_prefix_*``: layer j
    proposed from main's layers 0..j-1 (a round that starts at j after a rejection).
    """
    was = draft.training
    draft.eval()
    n, n_layers = hidden.shape[0], draft.num_layers
    r1_code = torch.zeros(n_layers - 1, dtype=torch.float64)
    r1_layer = torch.zeros_like(r1_code)
    gp_code = torch.zeros_like(r1_code)
    gp_layer = torch.zeros_like(r1_code)
    for i in range(0, n, batch_size):
        h, lay = hidden[i : i + batch_size], layers[i : i + batch_size].to(hidden.device)
        b = h.shape[0]
        eq = draft(h, lay[:, :1]).argmax(-1) == lay[:, 1:]
        r1_code += eq.double().mean(-1).sum(0).cpu()
        r1_layer += eq.all(-1).double().sum(0).cpu()
        for j in range(1, n_layers):
            logits = draft.all_logits(h, lay, torch.full((b,), j, dtype=torch.long, device=h.device))[:, j]
            eqj = logits.argmax(-1) == lay[:, j]
            gp_code[j - 1] += eqj.double().mean(-1).sum().cpu()
            gp_layer[j - 1] += eqj.all(-1).double().sum().cpu()
    draft.train(was)
    return {
        "round1_code_accuracy": (r1_code / n).tolist(),
        "round1_layer_agreement": (r1_layer / n).tolist(),
        "given_prefix_code_accuracy": (gp_code / n).tolist(),
        "given_prefix_layer_agreement": (gp_layer / n).tolist(),
    }
