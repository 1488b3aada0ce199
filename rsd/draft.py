"""Draft model of RSD (seed architecture) and its training helpers.

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

Training (DESIGN section 8): "all 128 codes equal" is a strict bar (0.99 per-code agreement gives ~28 % layer
acceptance), so the draft is trained to imitate the *main model's own greedy tokens* (distillation), optionally
mixed with ground-truth cross-entropy and a soft KL to main's distribution (which is what sampling-mode acceptance
rewards). We report per-layer per-code accuracy and per-layer whole-layer agreement.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

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
    """The seed's small transformer decoder: pre-norm self-attention blocks (causal; here over one token)."""

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
        """``[B, S, D] -> [B, S, D]`` with a causal mask (the seed feeds S = 1)."""
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
        # DESIGN section 8 variant: main's layer 0 is free from the prefill, so a draft that proposes layers
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
        from models.common.safetensors_io import save_sharded

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for old in [*d.glob("model-*.safetensors"), d / "model.safetensors.index.json", d / WEIGHTS_NAME]:
            old.unlink(missing_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        total = sum(v.numel() * v.element_size() for v in state.values())
        if total <= MAX_SHARD_BYTES:
            save_file(state, str(d / WEIGHTS_NAME), metadata={"format": "pt", "kind": "rsd-draft"})
        else:
            save_sharded(state, d, num_shards=-(-total // MAX_SHARD_BYTES), metadata={"kind": "rsd-draft"})
        (d / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> RFSQDraftModel:
        """Load a draft saved by :meth:`save`, single-file or sharded (safetensors only; no pickle)."""
        d = Path(directory)
        cfg = DraftConfig(**json.loads((d / CONFIG_NAME).read_text()))
        model = cls.from_config(cfg)
        if (d / WEIGHTS_NAME).is_file():
            state = load_file(str(d / WEIGHTS_NAME), device=str(device))
        else:
            from models.common.safetensors_io import checkpoint_shards

            shards, _ = checkpoint_shards(d)
            state = {}
            for shard in shards:
                state.update(load_file(str(shard), device=str(device)))
        model.load_state_dict(state)
        return model.to(device).eval()


# ---------------------------------------------------------------------- training
@dataclass
class DraftTrainConfig:
    """Optimiser settings (the seed's: AdamW 1e-4, wd 1e-5, clip 1.0, cosine with warm-up)."""

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
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(draft.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    n = hidden.shape[0]
    history: list[dict[str, float]] = []
    draft.train()
    steps = range(cfg.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="draft", leave=False)
    device = next(draft.parameters()).device
    for step in steps:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        logits = draft(hidden[idx].to(device), None if layer0 is None else layer0[idx].to(device))
        k = logits.shape[1]
        loss = draft_loss(
            logits,
            targets[idx, :k].to(device),
            None if gt_targets is None else gt_targets[idx, :k].to(device),
            None if teacher_logits is None else teacher_logits[idx, :k].to(device),
            cfg.gt_weight,
            cfg.kl_weight,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            rec = {"step": float(step + 1), "loss": float(loss.detach())}
            if val is not None:
                m = evaluate_draft(draft, *val, layer0=val_layer0)
                rec["val_code_acc"] = m.mean_code_accuracy
                for j, a in enumerate(m.layer_agreement):
                    rec[f"val_layer{j}_agree"] = a
            history.append(rec)
            logger.info("draft step %d: %s", step + 1, rec)
    draft.eval()
    return history
