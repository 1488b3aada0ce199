"""The ``serving.json`` file a checkpoint may carry: how it is served (read by ``server/policies/serving_defaults.py``).

This module owns the format -- the file name, its keys, its size limit -- and writes it (trainers and installers
write one beside the weights they save); the server reads and applies it under the user's own flags.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SERVING_FILE = "serving.json"
MAX_FILE_BYTES = 64 * 1024
#: The server settings a checkpoint may set: those that belong to a model, not to a deployment.
CONFIG_KEYS = ("denoising_steps", "embodiment_tag")
TOP_LEVEL_KEYS = ("policy", "config", "policy_options", "note")


def write_serving_file(checkpoint_dir: str | os.PathLike[str], policy: str, config: dict[str, Any] | None = None,
                       policy_options: dict[str, Any] | None = None, note: str = "") -> Path:
    """Write ``checkpoint_dir/serving.json`` (atomically); returns its path."""
    config, policy_options = dict(config or {}), dict(policy_options or {})
    bad = sorted(set(config) - set(CONFIG_KEYS))
    if bad:
        raise ValueError(f"serving config key(s) {', '.join(bad)} cannot be set by a checkpoint "
                         f"(it may set: {', '.join(CONFIG_KEYS)})")
    doc = {"policy": policy, "config": config, "policy_options": policy_options, "note": note}
    text = json.dumps(doc, indent=2) + "\n"
    if len(text.encode()) > MAX_FILE_BYTES:
        raise ValueError(f"serving settings of {len(text.encode())} bytes exceed {MAX_FILE_BYTES}")
    path = Path(checkpoint_dir) / SERVING_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
