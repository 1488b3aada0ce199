"""Serving settings a checkpoint carries: ``serving.json`` beside its weights, applied under the user's own flags.

Why: how a checkpoint is *served* decides its success as much as its weights. The shipped tiny GR00T solves 196/300
libero_spatial episodes served with 8 Euler steps from zero initial noise, 8 of each 16 actions executed per query,
and 146/300 at upstream's Gaussian draw (``docs/results/libero_spatial_2026-12-07_gr00t_zero_noise.json``). Those
settings used to be spelled in three places (the evaluation matrix, the DAgger script, the README command), and a
user who served the checkpoint with ``--model-path`` alone got the 49% model. Now the checkpoint says it once:

.. code-block:: json

    {"policy": "gr00t",
     "config": {"denoising_steps": 8, "embodiment_tag": "new_embodiment"},
     "policy_options": {"replan_steps": 8, "initial_noise": "zero"},
     "note": "why, with the measured figures"}

Precedence: a flag or ``VLA_SERVER_*`` variable the user gave > ``serving.json`` > the built-in default, so
``--policy-option initial_noise=gaussian`` still serves upstream's sampler; ``--no-serving-defaults`` ignores the
file. A checkpoint without the file (every released one) is served exactly as before. The server logs what it
applied and advertises it as ``metadata["serving_defaults"]``; the effective settings themselves are already in the
metadata an evaluation records (``denoising_steps``, ``initial_noise``, ``replan_steps``, ...), so the file is left
out of the checkpoint digest (:func:`models.common.digest.checkpoint_digest`): the weights are the same model.

The file is configuration a user put beside their weights, still read defensively: size-checked before reading,
JSON only, every key known, every value checked by the same code that checks the flag it stands for; a bad file
fails start-up with an error naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.settings import check_fields, from_sources
from models.common.serving import CONFIG_KEYS, MAX_FILE_BYTES, SERVING_FILE, TOP_LEVEL_KEYS
from server.config import ConfigError

if TYPE_CHECKING:
    from server.config import ServerConfig

log = logging.getLogger("server.policies.serving_defaults")


@dataclasses.dataclass(frozen=True)
class ServingDefaults:
    """A parsed ``serving.json``: the policy kind it is for and the raw values it sets."""

    path: Path
    policy: str | None
    config: dict[str, Any]
    policy_options: dict[str, Any]
    note: str = ""


def read_serving_defaults(model_path: str | Path | None) -> ServingDefaults | None:
    """The checkpoint's ``serving.json``, or ``None`` when it has none; a malformed file raises :class:`ConfigError`."""
    if model_path is None:
        return None
    path = Path(model_path) / SERVING_FILE
    if not path.is_file():
        return None
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: {size} bytes, more than the {MAX_FILE_BYTES} a serving-defaults file may have")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    unknown = sorted(set(doc) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(TOP_LEVEL_KEYS)})")
    policy, note = doc.get("policy"), doc.get("note", "")
    if policy is not None and not isinstance(policy, str):
        raise ConfigError(f"{path}: 'policy' must be a policy name, got {policy!r}")
    if not isinstance(note, str):
        raise ConfigError(f"{path}: 'note' must be text, got {type(note).__name__}")
    sections = {}
    for key in ("config", "policy_options"):
        section = doc.get(key, {})
        if not isinstance(section, dict) or not all(isinstance(v, (str, int, float, bool)) for v in section.values()):
            raise ConfigError(f"{path}: '{key}' must be an object of plain values (text, numbers, booleans)")
        sections[key] = section
    unknown = sorted(set(sections["config"]) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"{path}: config key(s) {', '.join(unknown)} cannot be set by a checkpoint (it may set: "
                          f"{', '.join(CONFIG_KEYS)})")
    return ServingDefaults(path, policy, sections["config"], sections["policy_options"], note)


def apply_serving_defaults(config: ServerConfig, policy: str, options_cls: type,
                           defaults: ServingDefaults | None) -> tuple[ServerConfig, dict[str, Any]]:
    """``config`` with the file's values filled in where the user set nothing; returns it and what was applied.

    Each value is checked as its flag would be (the error names the file and key), and the file's policy options
    are checked against ``options_cls`` (an unknown one is refused, as ``--policy-option`` would refuse it).
    """
    if defaults is None or not config.serving_defaults:
        return config, {}
    if defaults.policy is not None and defaults.policy != policy:
        raise ConfigError(f"{defaults.path}: these serving settings are for --policy {defaults.policy}, not {policy} "
                          "(serve it as that policy, or pass --no-serving-defaults)")
    applied_config = {k: v for k, v in defaults.config.items() if getattr(config, k) is None}
    known = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(defaults.policy_options) - known)
    if unknown:
        raise ConfigError(f"{defaults.path}: policy_options {', '.join(unknown)} unknown to --policy {policy} "
                          f"(known: {', '.join(sorted(known))})")
    # the file's options are checked in full, also those a flag overrides (a stale file is still a mistake)
    from_sources(options_cls, defaults.policy_options, env={}, error=ConfigError,
                 label=f"{defaults.path}: policy_options.{{name}}")
    applied_options = {k: v for k, v in defaults.policy_options.items() if k not in config.policy_options}
    text_options = {k: v if isinstance(v, str) else json.dumps(v) for k, v in applied_options.items()}
    try:
        check_fields(dataclasses.replace(config, **defaults.config), ConfigError)  # every file value, as a flag
    except ConfigError as exc:
        raise ConfigError(f"{defaults.path}: config: {exc}") from None
    new = dataclasses.replace(config, **applied_config, policy_options={**text_options, **config.policy_options})
    applied = {**applied_config, **{f"policy_option.{k}": v for k, v in applied_options.items()}}
    if applied:
        log.info("serving settings from %s: %s", defaults.path,
                 ", ".join(f"{k}={v}" for k, v in applied.items()))
    overridden = sorted(set(defaults.config) - set(applied_config)) + sorted(
        f"policy_option.{k}" for k in set(defaults.policy_options) - set(applied_options))
    if overridden:
        log.info("%s: overridden by this server's own flags/variables: %s", defaults.path, ", ".join(overridden))
    return new, applied
