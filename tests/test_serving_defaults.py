"""A checkpoint's serving.json: read defensively, applied under the user's own flags, outside the digest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from models.common.digest import checkpoint_digest
from models.common.serving import MAX_FILE_BYTES, SERVING_FILE, write_serving_file
from server.config import ConfigError, ServerConfig, parse_server_config
from server.policies import create_policy, policy_spec
from server.policies.builtin import GR00TOptions
from server.policies.serving_defaults import apply_serving_defaults, read_serving_defaults

REPO = Path(__file__).resolve().parents[1]
SHIPPED_GR00T = REPO / "models" / "checkpoints" / "gr00t-n1.5-tiny-libero-spatial"


def _write(dir_: Path, doc: object) -> Path:
    (dir_ / SERVING_FILE).write_text(json.dumps(doc))
    return dir_


def _apply(tmp_path: Path, doc: object, argv: list[str] | None = None) -> tuple[ServerConfig, dict]:
    _write(tmp_path, doc)
    config, _ = parse_server_config(["--policy", "gr00t", "--model-path", str(tmp_path), *(argv or [])], environ={})
    return apply_serving_defaults(config, "gr00t", GR00TOptions, read_serving_defaults(tmp_path))


SHIPPED_DOC = {"policy": "gr00t", "config": {"denoising_steps": 8, "embodiment_tag": "new_embodiment"},
               "policy_options": {"replan_steps": 8, "initial_noise": "zero"}}


def test_a_checkpoint_without_the_file_is_served_as_before(tmp_path: Path) -> None:
    assert read_serving_defaults(tmp_path) is None and read_serving_defaults(None) is None
    config, _ = parse_server_config(["--policy", "gr00t", "--model-path", str(tmp_path)], environ={})
    assert apply_serving_defaults(config, "gr00t", GR00TOptions, None) == (config, {})


def test_file_values_fill_what_the_user_left_unset(tmp_path: Path) -> None:
    config, applied = _apply(tmp_path, SHIPPED_DOC)
    assert config.denoising_steps == 8 and config.embodiment_tag == "new_embodiment"
    assert config.policy_options == {"replan_steps": "8", "initial_noise": "zero"}
    assert applied == {"denoising_steps": 8, "embodiment_tag": "new_embodiment", "policy_option.replan_steps": 8,
                       "policy_option.initial_noise": "zero"}


def test_the_users_flags_and_variables_win(tmp_path: Path) -> None:
    config, applied = _apply(tmp_path, SHIPPED_DOC, ["--denoising-steps", "4", "--policy-option",
                                                     "initial_noise=gaussian", "--policy-option", "replan_steps=0"])
    assert config.denoising_steps == 4
    assert config.policy_options == {"initial_noise": "gaussian", "replan_steps": "0"}
    assert applied == {"embodiment_tag": "new_embodiment"}
    _write(tmp_path, SHIPPED_DOC)
    config, _ = parse_server_config(["--policy", "gr00t", "--model-path", str(tmp_path)],
                                    environ={"VLA_SERVER_DENOISING_STEPS": "2"})
    config, applied = apply_serving_defaults(config, "gr00t", GR00TOptions, read_serving_defaults(tmp_path))
    assert config.denoising_steps == 2 and "denoising_steps" not in applied


def test_no_serving_defaults_ignores_the_file(tmp_path: Path) -> None:
    for argv, environ in ((["--no-serving-defaults"], {}), ([], {"VLA_SERVER_SERVING_DEFAULTS": "0"})):
        _write(tmp_path, SHIPPED_DOC)
        config, _ = parse_server_config(["--policy", "gr00t", "--model-path", str(tmp_path), *argv], environ=environ)
        assert config.serving_defaults is False
        new, applied = apply_serving_defaults(config, "gr00t", GR00TOptions, read_serving_defaults(tmp_path))
        assert new == config and applied == {}


@pytest.mark.parametrize("doc, message", [
    ({"policy": "gr00t", "colour": "red"}, "unknown key"),
    ({"policy": "gr00t", "config": {"max_batch": 64}}, "cannot be set by a checkpoint"),
    ({"policy": "gr00t", "config": {"denoising_steps": {"n": 8}}}, "plain values"),
    ({"policy": "gr00t", "policy_options": ["replan_steps=8"]}, "plain values"),
    ({"policy": 3}, "policy name"),
    ([1, 2], "JSON object"),
])
def test_a_malformed_file_names_itself_and_the_key(tmp_path: Path, doc: object, message: str) -> None:
    _write(tmp_path, doc)
    with pytest.raises(ConfigError, match=message) as err:
        read_serving_defaults(tmp_path)
    assert str(tmp_path / SERVING_FILE) in str(err.value)


def test_unreadable_or_oversized_files_are_refused_before_parsing(tmp_path: Path) -> None:
    (tmp_path / SERVING_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_serving_defaults(tmp_path)
    (tmp_path / SERVING_FILE).write_text(" " * (MAX_FILE_BYTES + 1))
    with pytest.raises(ConfigError, match="more than"):
        read_serving_defaults(tmp_path)


@pytest.mark.parametrize("doc, message", [
    ({"policy": "openvla"}, "for --policy openvla, not gr00t"),
    ({"policy_options": {"sampler": "ddim"}}, "policy_options sampler unknown"),
    ({"policy_options": {"initial_noise": "uniform"}}, "policy_options.initial_noise"),
    ({"policy_options": {"replan_steps": -1}}, "policy_options.replan_steps"),
    ({"config": {"denoising_steps": 0}}, "denoising"),
    ({"config": {"denoising_steps": "8"}}, "denoising"),
])
def test_bad_values_fail_at_start_up_naming_the_file(tmp_path: Path, doc: dict, message: str) -> None:
    # checked even where the user's own flag overrides it: a stale file is still a mistake
    with pytest.raises(ConfigError, match=message) as err:
        _apply(tmp_path, doc, ["--denoising-steps", "4", "--policy-option", "initial_noise=zero"])
    assert SERVING_FILE in str(err.value)


def test_the_file_is_not_part_of_the_checkpoint_digest(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(SHIPPED_GR00T, ckpt)
    with_file = checkpoint_digest(ckpt)
    (ckpt / SERVING_FILE).unlink()
    assert checkpoint_digest(ckpt) == with_file
    (ckpt / "experiment_cfg" / SERVING_FILE).write_text("{}")  # only the top-level file is settings
    assert checkpoint_digest(ckpt) != with_file


def test_write_serving_file_round_trips_and_refuses_deployment_keys(tmp_path: Path) -> None:
    path = write_serving_file(tmp_path, "gr00t", {"denoising_steps": 6}, {"initial_noise": "zero"}, "why")
    got = read_serving_defaults(tmp_path)
    assert path == tmp_path / SERVING_FILE and got is not None
    assert (got.policy, got.config, got.policy_options, got.note) == ("gr00t", {"denoising_steps": 6},
                                                                     {"initial_noise": "zero"}, "why")
    with pytest.raises(ValueError, match="port"):
        write_serving_file(tmp_path, "gr00t", {"port": 1})


def test_the_shipped_gr00t_is_built_as_its_file_says() -> None:
    """Through the one policy factory, with nothing but the checkpoint path."""
    assert policy_spec("gr00t").options is GR00TOptions
    policy = create_policy(ServerConfig(policy="gr00t", model_path=str(SHIPPED_GR00T)))
    try:
        meta = policy.served_metadata()
    finally:
        policy.close()
    doc = json.loads((SHIPPED_GR00T / SERVING_FILE).read_text())
    assert (meta["denoising_steps"], meta["initial_noise"], meta["replan_steps"]) == (
        doc["config"]["denoising_steps"], doc["policy_options"]["initial_noise"], doc["policy_options"]["replan_steps"])
    assert set(meta["serving_defaults"]) == {"denoising_steps", "embodiment_tag", "policy_option.replan_steps",
                                             "policy_option.initial_noise"}
