"""Policies backed by the project's model code: stock OpenVLA and GR00T N1.5 (torch imported lazily).

Both load a released-format local checkpoint through :func:`models.load_pretrained` (the same code
path a 7B/3B checkpoint takes) and accept the LIBERO observation (``image``, ``wrist_image``,
``state``, ``instruction``); the GR00T policy also accepts GR00T-style keys (``video.*``,
``state.*``, ``annotation.*``) as the upstream server does. Which keys become which model input is the model
package's business (``models/openvla/data_config.py``, ``models/gr00t/data_config.py``); the policies here check
the observation, batch it and report what they did.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from models.openvla.data_config import GRIPPER_CONVENTIONS, LiberoDataConfig, gripper_convention_from_stats
from server.policies.base import Policy, PolicyInputError, PolicyOutput

logger = logging.getLogger(__name__)

__all__ = ["GRIPPER_CONVENTIONS", "GR00TPolicy", "OpenVLAPolicy", "OpenVLARSDPolicy"]


def _check_image(obs: dict[str, Any], key: str, required: bool) -> None:
    img = obs.get(key)
    if img is None:
        if required:
            raise PolicyInputError(f"obs[{key!r}] is required (uint8 HxWx3)")
        return
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise PolicyInputError(f"obs[{key!r}] must be a uint8 HxWx3 array")


def _check_instruction(obs: dict[str, Any]) -> None:
    if not isinstance(obs.get("instruction"), str) or not obs["instruction"].strip():
        raise PolicyInputError("obs['instruction'] must be a non-empty string")


def _check_state(obs: dict[str, Any], dim: int) -> None:
    state = obs.get("state")
    if not isinstance(state, np.ndarray) or state.dtype.kind != "f" or state.shape != (dim,):
        raise PolicyInputError(f"obs['state'] must be a float array of shape ({dim},)")


class OpenVLAPolicy(Policy):
    """Stock OpenVLA decoding: 7 greedy action tokens, 256 bins, unnormalised; a chunk of one step."""

    name = "openvla"

    def __init__(self, model: Any, model_path: str, unnorm_key: str | None, center_crop: bool,
                 gripper_convention: str | None, quantization: dict[str, Any],
                 data_config: LiberoDataConfig | None = None) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.model_path = model_path
        self.data_config = data_config or LiberoDataConfig()
        self.unnorm_key = model.resolve_unnorm_key(unnorm_key)
        self.center_crop = center_crop
        stats = model.norm_stats[self.unnorm_key]["action"]
        self.gripper_convention = gripper_convention or gripper_convention_from_stats(stats)
        self.action_dim = len(stats["q01"])
        self.quantization = quantization

    def validate(self, obs: dict[str, Any]) -> None:
        _check_image(obs, self.data_config.image_key, required=True)
        _check_instruction(obs)

    def infer(self, observations: list[dict[str, Any]]) -> list[PolicyOutput]:
        images, instructions = self.data_config.from_libero(observations)
        with self.torch.inference_mode():
            actions = self.model.predict_action(images, instructions, unnorm_key=self.unnorm_key,
                                                center_crop=self.center_crop)
        actions = np.asarray(actions, dtype=np.float32).reshape(len(observations), 1, -1)
        return [PolicyOutput(actions=a) for a in actions]

    def metadata(self) -> dict[str, Any]:
        return {
            "model_id": self.model_path,
            "policy": "openvla",
            "kind": "OpenVLA (Prismatic) stock decoding: 7 greedy action tokens, 256 bins",
            "action_horizon": 1,
            "action_dim": self.action_dim,
            "gripper_convention": self.gripper_convention,
            "unnorm_key": self.unnorm_key,
            "quantization": self.quantization,
        }


class GR00TPolicy(Policy):
    """GR00T N1.5: Eagle backbone + flow-matching DiT head, ``denoising_steps`` Euler steps, 16-step chunks."""

    name = "gr00t"

    def __init__(self, model: Any, model_path: str, gripper_convention: str, quantization: dict[str, Any]) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.model_path = model_path
        self.gripper_convention = gripper_convention
        self.quantization = quantization
        self.data_config = model.data_config
        # The sampler's noise is drawn on the model's device, so the generator must live there too.
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(0)

    def _to_gr00t(self, obs: dict[str, Any]) -> dict[str, Any]:
        if any(k.startswith("video.") for k in obs):
            return obs
        return self.data_config.from_libero(obs["image"], obs.get("wrist_image", obs["image"]), obs["state"],
                                            obs["instruction"])

    def validate(self, obs: dict[str, Any]) -> None:
        if any(k.startswith("video.") for k in obs):
            missing = [k for k in (*self.data_config.video_keys, *self.data_config.state_keys) if k not in obs]
            if missing:
                raise PolicyInputError(f"GR00T-style observation lacks {missing}")
            return
        _check_image(obs, "image", required=True)
        _check_image(obs, "wrist_image", required=False)
        _check_instruction(obs)
        _check_state(obs, self.data_config.state_dim)

    def infer(self, observations: list[dict[str, Any]]) -> list[PolicyOutput]:
        converted = [self._to_gr00t(o) for o in observations]
        keys = converted[0].keys()
        stackable = all(c.keys() == keys for c in converted) and all(
            np.asarray(c[k]).shape == np.asarray(converted[0][k]).shape for c in converted for k in keys
            if not isinstance(c[k], (list, str)))
        groups = [converted] if stackable else [[c] for c in converted]
        outputs: list[PolicyOutput] = []
        with self.torch.inference_mode():
            for group in groups:
                batch: dict[str, Any] = {}
                for k in keys:
                    vals = [g[k] for g in group]
                    if isinstance(vals[0], (list, tuple)):
                        batch[k] = [v for val in vals for v in val]
                    elif isinstance(vals[0], str):
                        batch[k] = list(vals)
                    else:
                        batch[k] = np.concatenate([np.asarray(v) for v in vals], axis=0)
                actions = self.model.get_action(batch, generator=self.generator).numpy()
                outputs.extend(PolicyOutput(actions=a.astype(np.float32)) for a in actions)
        return outputs

    def reset(self) -> None:
        self.generator.manual_seed(0)

    def metadata(self) -> dict[str, Any]:
        head = self.model.config.action_head_cfg
        return {
            "model_id": self.model_path,
            "policy": "gr00t",
            "kind": "GR00T N1.5 (Eagle VLM + flow-matching DiT action head)",
            "action_horizon": int(head["action_horizon"]),
            "action_dim": self.data_config.action_dim,
            "denoising_steps": int(self.model.denoising_steps),
            "initial_noise": self.model.initial_noise,
            "instruction_text": self.model.instruction_text,
            "embodiment_tag": self.data_config.embodiment_tag,
            "gripper_convention": self.gripper_convention,
            "quantization": self.quantization,
        }


class OpenVLARSDPolicy(Policy):
    """OpenVLA backbone + RFSQ layer head decoded with residual speculative decoding (the default policy).

    One forward batch = one :meth:`SpeculativeDecoder.generate` call over the stacked requests; each reply
    carries the batch's RSD statistics (per-layer acceptance, main passes, timings) and ``metadata`` holds
    running totals, so acceptance can be watched while an evaluation runs.
    """

    name = "openvla-rsd"

    def __init__(self, model: Any, model_path: str, rsd_config: Any, quantization: dict[str, Any],
                 data_config: LiberoDataConfig | None = None) -> None:
        import torch

        from rsd.engine import SpeculativeDecoder

        self.torch = torch
        self.model = model
        self.model_path = model_path
        cfg = model.cfg
        # The checkpoint's rsd_config.json says whether it reads the wrist camera / the state (OpenVLA-OFT style).
        self.data_config = data_config or LiberoDataConfig(
            wrist_image_key="wrist_image" if cfg.use_wrist_image else None,
            state_key="state" if cfg.use_proprio else None)
        self.rsd_config = rsd_config
        self.quantization = quantization
        if model.draft is None and rsd_config.enabled:
            logger.warning("checkpoint has no draft model: decoding with the main model only")
        self.engine = SpeculativeDecoder(model.main, model.draft, rsd_config, tokenizer=model.tokenizer)
        self.tokenizer = model.tokenizer
        self._chunks = 0
        self._passes = 0
        self._accepted: list[float] = []
        self._reached: list[float] = []
        self._chosen_k: dict[int, int] = {}
        self._dev_mm_sum = 0.0
        self._dev_mm_max = 0.0
        self.pass_costs = self._calibrate() if model.draft is not None and rsd_config.enabled else {}

    def _calibrate(self) -> dict[str, float]:
        """Time prefill, n-token passes and the draft once at start-up (the adaptive planner's first costs)."""
        torch = self.torch
        cfg = self.model.cfg
        zeros = np.zeros((1, 128, 128, 3), np.uint8)
        with torch.inference_mode():  # any image size: the processor resizes
            embeds, mask = self.model.prefix(zeros, ["calibrate the pass costs"],
                                             states=np.zeros((1, cfg.proprio_dim), np.float32),
                                             wrist_images=zeros)
            costs = self.engine.calibrate(embeds, mask)
        logger.info("RSD pass costs at start-up (ms): %s", {k: round(v, 3) for k, v in costs.items()})
        return costs

    def validate(self, obs: dict[str, Any]) -> None:
        _check_image(obs, self.data_config.image_key, required=True)
        if self.data_config.wrist_image_key is not None:
            _check_image(obs, self.data_config.wrist_image_key, required=True)
        if self.data_config.state_key is not None:
            _check_state(obs, self.model.cfg.proprio_dim)
        _check_instruction(obs)

    def infer(self, observations: list[dict[str, Any]]) -> list[PolicyOutput]:
        torch = self.torch
        proc = self.model.processor
        crop = self.model.cfg.center_crop
        images, instructions = self.data_config.from_libero(observations)
        wrist_key, state_key = self.data_config.wrist_image_key, self.data_config.state_key
        with torch.inference_mode():
            pixel_values = torch.cat([proc.preprocess_images(np.asarray(img)[None], crop) for img in images])
            wrist_pixel_values = None if wrist_key is None else torch.cat(
                [proc.preprocess_images(np.asarray(o[wrist_key])[None], crop) for o in observations])
            states = None if state_key is None else np.stack(
                [np.asarray(o[state_key], dtype=np.float32) for o in observations])
            embeds, mask = self.model.prefix(None, instructions, pixel_values=pixel_values, states=states,
                                             wrist_pixel_values=wrist_pixel_values)
            layers, stats = self.engine.generate(embeds, mask)
            actions = self.engine.decode_actions(layers, stats.decoded_layers, stats.main_logits).float().numpy()
        summary = stats.to_dict()
        summary.pop("action_dev_mm", None)
        summary.pop("action_dev_deg", None)
        self._chunks += len(observations)
        self._passes += sum(stats.main_passes_per_sample)
        width = stats.accepted.shape[1]
        if len(self._accepted) < width:
            self._accepted += [0.0] * (width - len(self._accepted))
            self._reached += [0.0] * (width - len(self._reached))
        for j in range(width):
            self._accepted[j] += float(stats.accepted[:, j].float().sum())
            self._reached[j] += float(stats.reached[:, j].float().sum())
        for k in stats.chosen_k:
            self._chosen_k[k] = self._chosen_k.get(k, 0) + 1
        if stats.action_dev_mm is not None:
            self._dev_mm_sum += float(stats.action_dev_mm.sum())
            self._dev_mm_max = max(self._dev_mm_max, float(stats.action_dev_mm.max()))
        outputs = []
        for i, a in enumerate(actions):
            info = dict(summary)
            info["main_passes_this_sample"] = stats.main_passes_per_sample[i]
            info["accepted_this_sample"] = [bool(x) for x in stats.accepted[i].tolist()]
            if stats.action_dev_mm is not None and stats.action_dev_deg is not None:
                # relaxed-action: deviation from main's choices summed over the kept drafted layers
                info["action_dev_mm"] = round(float(stats.action_dev_mm[i]), 4)
                info["action_dev_deg"] = round(float(stats.action_dev_deg[i]), 4)
            outputs.append(PolicyOutput(actions=a, info={"rsd": info}))
        return outputs

    def reset(self) -> None:
        self.engine.reseed(self.rsd_config.seed)

    def live_metadata(self) -> dict[str, Any]:
        n = max(1, self._chunks)
        return {"rsd_totals": {
            "chunks": self._chunks,
            "mean_main_passes_per_chunk": self._passes / n if self._chunks else None,
            "per_layer_acceptance": [a / n for a in self._accepted] if self._chunks else None,
            "per_layer_acceptance_given_reached": [a / r if r else None for a, r in
                                                   zip(self._accepted, self._reached, strict=True)],
            "chosen_k_counts": {str(k): v for k, v in sorted(self._chosen_k.items())},
            "mean_action_dev_mm": self._dev_mm_sum / n if self._chunks else None,
            "max_action_dev_mm": self._dev_mm_max if self._chunks else None,
            "estimated_acceptance": [round(a, 4) for a in self.engine.costs.acceptance],
        }}

    def metadata(self) -> dict[str, Any]:
        import dataclasses

        return {
            "model_id": self.model_path,
            "policy": "openvla-rsd",
            "kind": "OpenVLA (Prismatic) + RFSQ layer head, residual speculative decoding, robust RFSQ decoder",
            "action_horizon": int(self.tokenizer.chunk_len),
            "action_dim": int(self.tokenizer.config.action_dim),
            "gripper_convention": "libero",
            "inputs": self.model.input_keys,
            "rsd_config": dataclasses.asdict(self.rsd_config),
            "has_draft": self.model.draft is not None,
            "draft_kind": "deep" if getattr(self.model.draft, "deep", False) else "seed",
            "pass_costs_ms": {k: round(v, 4) for k, v in self.pass_costs.items()},
            "quantization": self.quantization,
        }
