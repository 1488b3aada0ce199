"""One-shot DuQuant W4A8 serving for a LIBERO suite (the logic behind ``./run_libero_quant_w4a8.sh``).

Show the configuration, list the layers that will be quantised (dry run), ask for confirmation, then start the
quantised policy server::

    ./run_libero_quant_w4a8.sh SUITE [MODEL_PATH] [--policy gr00t|openvla|openvla-rsd] [--yes] [--port P]
                               [--device cpu|cuda] [--denoising-steps N] [--calib-data GLOB|none]
                               [--scan-only] [--plan] [-- EXTRA SERVER FLAGS]

    ./run_libero_quant_w4a8.sh libero_spatial                                   # artifacts/gr00t/libero_spatial
    ./run_libero_quant_w4a8.sh libero_goal /ckpt/gr00t-n1.5-libero-goal --yes --port 5556
    then, in another terminal:  ./run_libero_eval.sh libero_spatial --headless --port 5555

Defaults are the published recipe's (W4 A8, BLOCK 16, PERMUTE 1, ROW_ROT restore, ACT_PCT 99.9, CALIB_STEPS 32, LS 0.15,
PACKDIR artifacts/duquant_packs/<policy>); any GR00T_DUQUANT_* already in the environment wins. Layer selection
uses quant/'s defaults (checked against the real GR00T N1.5 / OpenVLA module names), not the published recipe's regexes (docs/duquant.md).
Calibration: CALIB_STEPS observations from the suite's demonstrations (artifacts/demos/SUITE/*.hdf5, or
--calib-data) when they exist, for every policy; else layers calibrate lazily on their first CALIB_STEPS calls.
--yes, or a stdin that is not a terminal, skips the confirmation. --scan-only stops after the listing; --plan
prints the configuration and the server command without scanning or starting anything.

Why Python rather than bash: the suite list comes from :data:`client.libero.protocol.SUITES` and the recipe
defaults from :mod:`benchmarks.support.libero_matrix`, so this entry point cannot drift from the evaluator and
the success-rate matrix.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.support.libero_matrix import DUQUANT_SEED_ENV
from client.libero.protocol import SUITES
from client.testing import REPO
from models.common.serving import SERVING_FILE

PROG = "run_libero_quant_w4a8.sh"
POLICIES = ("gr00t", "openvla", "openvla-rsd")
SEED_CALIB_STEPS = "32"


class PlanError(Exception):
    """A bad invocation: the message is printed and the process exits with code 2."""


@dataclass
class Plan:
    """Everything the entry point decided: what it prints, the environment and the server command."""

    suite: str
    policy: str
    model_path: str
    port: int
    device: str
    denoising_steps: int | None  # None: the checkpoint's serving.json says
    calib_data: str | None
    calib_note: str
    env: dict[str, str]
    server_args: list[str] = field(default_factory=list)

    @property
    def duquant_env(self) -> dict[str, str]:
        return {k: v for k, v in self.env.items() if k.startswith("GR00T_DUQUANT_")}

    def header(self) -> list[str]:
        shown = self.denoising_steps if self.denoising_steps is not None else "the checkpoint's serving.json"
        steps = f"   denoising steps: {shown}" if self.policy == "gr00t" else ""
        lines = [
            "=" * 62,
            f" DuQuant W4A8 policy server for LIBERO ({self.suite})",
            "=" * 62,
            f" policy            : {self.policy}",
            f" model path        : {self.model_path}",
            f" port              : {self.port}   device: {self.device}{steps}",
            f" calibration       : {self.calib_note}",
            " effective DuQuant configuration (GR00T_DUQUANT_*):",
        ]
        lines += [f"   {k[len('GR00T_DUQUANT_'):]}={v}" for k, v in sorted(self.duquant_env.items())]
        return lines

    def server_command(self) -> list[str]:
        return ["./run_inference_server.sh", *self.server_args]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", metavar="SUITE", help=f"one of {', '.join(SUITES)}")
    ap.add_argument("model_path_arg", metavar="MODEL_PATH", nargs="?", default=None,
                    help="released-format checkpoint directory (default: artifacts/<policy>/SUITE)")
    ap.add_argument("--model-path", "--model_path", dest="model_path", default=None, help="same as MODEL_PATH")
    ap.add_argument("--policy", default="gr00t", help=f"one of {', '.join(POLICIES)} (default gr00t)")
    ap.add_argument("--yes", "-y", action="store_true", help="do not ask before starting the server")
    ap.add_argument("--port", default="5555")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--denoising-steps", "--denoising_steps", dest="denoising_steps", type=int, default=None,
                    help="GR00T flow-matching steps (default: the checkpoint's serving.json, else 8)")
    ap.add_argument("--calib-data", default="auto",
                    help="glob of demonstration HDF5s, or none (default: artifacts/demos/SUITE/*.hdf5 if any)")
    ap.add_argument("--scan-only", "--dry-run", dest="scan_only", action="store_true",
                    help="stop after listing the layers")
    ap.add_argument("--plan", action="store_true",
                    help="print the configuration and the server command, then exit (no scan, no server)")
    return ap


def _split_extra(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def make_plan(ns: argparse.Namespace, extra: Sequence[str], environ: Mapping[str, str]) -> Plan:
    """Validate the flags and work out the environment and the server command (reads only the file system)."""
    if ns.suite not in SUITES:
        raise PlanError(f"unknown suite '{ns.suite}' ({'|'.join(SUITES)})")
    if ns.policy not in POLICIES:
        raise PlanError(f"--policy must be {', '.join(POLICIES[:-1])} or {POLICIES[-1]} (got '{ns.policy}')")
    if not str(ns.port).isdigit():
        raise PlanError(f"--port must be a number (got '{ns.port}')")
    if ns.model_path_arg and ns.model_path and ns.model_path_arg != ns.model_path:
        raise PlanError(f"unexpected argument {ns.model_path_arg} (--model-path is {ns.model_path})")
    model_path = ns.model_path or ns.model_path_arg
    if not model_path:
        model_path = f"artifacts/{ns.policy.replace('-', '_')}/{ns.suite}"
    if not Path(model_path).is_dir():
        hint = [f"{PROG}: model directory '{model_path}' does not exist."]
        if ns.policy == "gr00t":
            hint.append(f"  train one:  .venv/bin/python -m models.gr00t.train --demos 'artifacts/demos/{ns.suite}/"
                        f"*.hdf5' --out {model_path}")
        hint.append("  or pass a released-format checkpoint directory as the second argument.")
        raise PlanError("\n".join(hint))
    if not (Path(model_path) / "config.json").is_file():
        raise PlanError(f"'{model_path}' has no config.json: not a released-format {ns.policy} checkpoint")

    # Recipe defaults; anything already exported wins. SCOPE="" (as the published recipe sets it) also turns DuQuant on.
    env = dict(environ)
    env.setdefault("GR00T_DUQUANT_SCOPE", "")
    for key, value in {**DUQUANT_SEED_ENV, "GR00T_DUQUANT_CALIB_STEPS": SEED_CALIB_STEPS,
                       "GR00T_DUQUANT_PACKDIR": f"artifacts/duquant_packs/{ns.policy}"}.items():
        if not env.get(key):
            env[key] = value
    env.pop("GR00T_DUQUANT_DRYRUN", None)  # the server must quantise, not list and exit
    calib_steps = env["GR00T_DUQUANT_CALIB_STEPS"]

    server_args = ["--policy", ns.policy, "--model-path", model_path, "--port", str(ns.port), "--device", ns.device]
    steps = ns.denoising_steps
    if ns.policy == "gr00t":
        if steps is None and not (Path(model_path) / SERVING_FILE).is_file():
            steps = 8  # upstream's LIBERO serving; a checkpoint's serving.json sets its own
        server_args += ["--embodiment-tag", "new_embodiment"]
        if steps is not None:
            server_args += ["--denoising-steps", str(steps)]
    calib: str | None = ns.calib_data
    if calib == "auto":
        calib = f"artifacts/demos/{ns.suite}/*.hdf5"
        if not glob.glob(calib):
            calib = None
    elif calib == "none":
        calib = None
    elif not glob.glob(calib, recursive=True):
        raise PlanError(f"--calib-data '{calib}': no files match")
    if calib is None:
        note = f"lazy (first {calib_steps} calls of each layer)"
    else:
        server_args += ["--policy-option", f"calib_data={calib}", "--policy-option", f"calib_n={calib_steps}"]
        note = f"{calib_steps} demonstration observations from {calib}"
    return Plan(ns.suite, ns.policy, model_path, int(ns.port), ns.device, steps, calib, note, env,
                [*server_args, *extra])


def _scan(plan: Plan) -> int:
    """The dry-run listing of the layers the server will replace (``quant.scan``, meta device, no weights)."""
    py = str(REPO / ".venv" / "bin" / "python")
    py = py if Path(py).exists() else sys.executable
    env = {**plan.env, "GR00T_DUQUANT_DRYRUN": "1"}
    return subprocess.run([py, "-m", "quant.scan", "--policy", plan.policy, "--model-path", plan.model_path],
                          cwd=REPO, env=env).returncode


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = _split_extra(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    ns = ap.parse_args(args)
    os.chdir(REPO)  # relative defaults (artifacts/...) and ./run_inference_server.sh are repository paths
    try:
        plan = make_plan(ns, extra, os.environ)
    except PlanError as exc:
        msg = str(exc)
        print(msg if msg.startswith(PROG) else f"{PROG}: {msg}", file=sys.stderr)
        return 2
    rule = "-" * 62
    print("\n".join(plan.header()))
    if ns.plan:
        print(rule)
        print("server command: " + " ".join(plan.server_command()))
        return 0
    print(rule)
    print(" dry run: layers that will be quantised")
    print(rule, flush=True)
    rc = _scan(plan)
    print(rule, flush=True)
    if rc != 0:
        return rc
    if ns.scan_only:
        print("--scan-only: not starting the server")
        return 0
    if not ns.yes and sys.stdin.isatty():
        answer = input(f"Start the quantised server on port {plan.port}? [y/N] ")
        if answer not in ("y", "Y", "yes", "YES"):
            print("aborted")
            return 1
    print("starting: " + " ".join(plan.server_command()))
    print(f"then run: ./run_libero_eval.sh {plan.suite} --headless --port {plan.port}", flush=True)
    cmd = plan.server_command()
    os.execve(cmd[0], cmd, plan.env)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
