"""OpenVLA-OFT policy: parallel decoding of an 8-step chunk in one forward pass (``models/openvla/oft.py``).

Reads the LIBERO observation: ``image`` (third-person), ``wrist_image`` (when the model takes two images),
``state`` (8-D, when the checkpoint has a proprio projector) and ``instruction``. Replies ``[chunk, action_dim]``
float32 actions unnormalised with the checkpoint's ``bounds_q99`` statistics, in the gripper convention of its
action statistics (``openvla`` for the released LIBERO fine-tunes: gripper in [0, 1], 1 = open).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.openvla.data_config import gripper_convention_from_stats
from server.policies.base import Policy, PolicyInputError, PolicyOutput
from server.policies.model_policies import _check_image, _check_instruction


class OpenVLAOFTPolicy(Policy):
    name = "openvla-oft"

    def __init__(self, model: Any, model_path: str, unnorm_key: str | None, center_crop: bool,
                 gripper_convention: str | None, quantization: dict[str, Any]) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.model_path = model_path
        self.unnorm_key = model.resolve_unnorm_key(unnorm_key)
        self.center_crop = center_crop
        stats = model.norm_stats[self.unnorm_key]["action"]
        self.gripper_convention = gripper_convention or gripper_convention_from_stats(stats)
        self.quantization = quantization

    def validate(self, obs: dict[str, Any]) -> None:
        _check_image(obs, "image", required=True)
        if self.model.num_images > 1:
            _check_image(obs, "wrist_image", required=True)
        dim = self.model.proprio_dim
        if dim is not None:
            state = obs.get("state")
            if not isinstance(state, np.ndarray) or state.dtype.kind != "f" or state.shape != (dim,):
                raise PolicyInputError(f"obs['state'] must be a float array of shape ({dim},)")
        _check_instruction(obs)

    def infer(self, observations: list[dict[str, Any]]) -> list[PolicyOutput]:
        cams = ["image", "wrist_image"][: self.model.num_images]
        images = []
        for key in cams:
            frames = [np.asarray(o[key]) for o in observations]
            same = all(f.shape == frames[0].shape for f in frames)
            images.append(np.stack(frames) if same else frames)
        states = None
        if self.model.proprio_dim is not None:
            states = np.stack([np.asarray(o["state"], dtype=np.float64) for o in observations])
        instructions = [str(o["instruction"]) for o in observations]
        with self.torch.inference_mode():
            actions = self.model.predict_action(images, instructions, states, unnorm_key=self.unnorm_key,
                                                center_crop=self.center_crop)
        return [PolicyOutput(actions=np.asarray(a, dtype=np.float32)) for a in actions]

    def metadata(self) -> dict[str, Any]:
        return {
            "model_id": self.model_path,
            "policy": "openvla-oft",
            "kind": "OpenVLA-OFT: parallel decoding (bidirectional attention) + L1-regression MLP action head",
            "action_horizon": int(self.model.chunk),
            "action_dim": int(self.model.action_dim),
            "gripper_convention": self.gripper_convention,
            "unnorm_key": self.unnorm_key,
            "num_images_in_input": int(self.model.num_images),
            "use_proprio": self.model.proprio_dim is not None,
            "center_crop": self.center_crop,
            "inputs": self.model.input_keys,
            "quantization": self.quantization,
        }
