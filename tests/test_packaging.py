"""Packaging: `pip install .[client]` installs the client only; the entry points run or explain what is missing."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("vla-serve", "vla-eval", "vla-train", "vla-quant-scan", "vla-record-demos", "vla-render-demos")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Build from a copy of what git tracks, so the build leaves nothing (build/, *.egg-info) in the checkout and
    # untracked local files cannot end up in the wheel.
    src = tmp_path_factory.mktemp("src")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    for extra in ("client", "pyproject.toml"):  # the working tree's version of what is being packaged
        if (REPO / extra).is_dir():
            shutil.copytree(REPO / extra, src / extra, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / extra, src / extra)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                   check=True, capture_output=True, text=True, timeout=600)
    (path,) = out.glob("*.whl")
    return path


def test_wheel_holds_the_client_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"client"}, tops
    assert not [n for n in names if n.endswith((".safetensors", ".pt", ".hdf5"))]
    meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = email.message_from_bytes(zipfile.ZipFile(wheel).read(meta_name))
    requires = meta.get_all("Requires-Dist") or []
    base = [r for r in requires if "extra ==" not in r]
    client_extra = [r for r in requires if "extra == \"client\"" in r]
    assert sorted(r.split(">")[0].split("=")[0].strip() for r in base) == ["msgpack", "numpy", "pyzmq"]
    assert not [r for r in base + client_extra if r.startswith(("torch", "transformers"))]
    entry_points = zipfile.ZipFile(wheel).read(meta_name.replace("METADATA", "entry_points.txt")).decode()
    for script in SCRIPTS:
        assert f"{script} = client.cli:" in entry_points


@pytest.mark.slow
def test_client_install_in_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"{wheel}[client]"], check=True, env=env,
                   capture_output=True, text=True, timeout=900)
    probe = (
        "import importlib.util as u, client.policy_client, client.wire, client.settings;"
        "print(sorted(m for m in ('torch', 'server', 'quant', 'rsd', 'models', 'transformers') if u.find_spec(m)))"
    )
    found = subprocess.run([str(py), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                           check=True).stdout.strip()
    assert found == "[]", found
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert not list(Path(site).rglob("*.safetensors"))
    serve = subprocess.run([str(env_dir / "bin" / "vla-serve"), "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert serve.returncode == 2 and "server stack" in serve.stderr and "Traceback" not in serve.stderr
    train = subprocess.run([str(env_dir / "bin" / "vla-train"), "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert train.returncode == 0 and "openvla-rsd" in train.stdout


def test_entry_points_run_the_server_stack_here(tmp_path: Path) -> None:
    bindir = Path(sys.executable).parent
    out = subprocess.run([str(bindir / "vla-serve"), "--list-policies"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "openvla-rsd" in out.stdout and "gr00t" in out.stdout
    bad = subprocess.run([str(bindir / "vla-train"), "nope"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "unknown stage 'nope'" in bad.stderr


def test_shipped_checkpoint_is_found_through_the_package() -> None:
    import models

    path = models.shipped_checkpoint()
    assert path == Path(models.__file__).resolve().parent / "checkpoints" / models.EMBEDDED_OPENVLA_RSD
    assert (path / "config.json").is_file()
    assert (models.shipped_checkpoint(models.EMBEDDED_GR00T) / "config.json").is_file()
