"""Console entry points (``[project.scripts]`` in pyproject.toml): ``vla-serve``, ``vla-eval``, ``vla-train``,
``vla-quant-scan``, ``vla-record-demos``, ``vla-render-demos``.

Why they live in ``client/``: the installable distribution is the client (``pip install .[client]`` brings the
wire codec, the policy client and the LIBERO evaluation, never torch); the server stack (``server``, ``quant``,
``rsd``, ``models`` and the shipped checkpoints) runs from a checkout, which ``scripts/setup.sh server`` puts on the
server environment's path. So each server-side command imports its module lazily and, where that stack is not
importable, stops with a message saying how to get it instead of a ``ModuleNotFoundError`` traceback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

_SERVER_STACK_HINT = (
    "{prog}: the server stack (server/, quant/, rsd/, models/) is not importable in this environment ({exc}).\n"
    "It runs from a checkout: `scripts/setup.sh server` creates .venv with it; in your own environment install\n"
    "the `server` extra and put the checkout on the path (PYTHONPATH, or a .pth file as setup.sh writes).\n"
    "(`pip install .[client]` installs the client only, by design.)\n"
)

#: ``vla-train`` subcommands -> the module whose ``main(argv)`` runs that stage.
TRAINERS: dict[str, tuple[str, str]] = {
    "rfsq": ("rsd.train_rfsq", "robust RFSQ action tokenizer (python -m rsd.train_rfsq)"),
    "openvla-rsd": ("rsd.train_vla", "OpenVLA-RSD main model or draft: `main ...` | `draft ...` "
                    "(python -m rsd.train_vla)"),
    "gr00t": ("models.gr00t.train", "GR00T N1.5 policy (python -m models.gr00t.train)"),
}


def _run(module: str, prog: str, argv: Sequence[str] | None, server_side: bool = True) -> int:
    try:
        main: Callable[[list[str] | None], int | None] = importlib.import_module(module).main
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if not server_side or top not in ("server", "quant", "rsd", "models", "torch", "transformers",
                                          "safetensors", "h5py", "uvloop"):
            raise
        sys.stderr.write(_SERVER_STACK_HINT.format(prog=prog, exc=exc))
        return 2
    rc = main(list(sys.argv[1:] if argv is None else argv))
    return int(rc or 0)


def serve(argv: Sequence[str] | None = None) -> int:
    """``vla-serve [flags]``: the policy inference server (same flags as ``python -m server``)."""
    return _run("server.__main__", "vla-serve", argv)


def evaluate(argv: Sequence[str] | None = None) -> int:
    """``vla-eval SUITE --headless [flags]``: headless LIBERO evaluation against a running server."""
    return _run("client.libero.evaluate", "vla-eval", argv, server_side=False)


def record_demos(argv: Sequence[str] | None = None) -> int:
    """``vla-record-demos``: scripted-expert demonstrations (``python -m client.libero.record_demos``)."""
    return _run("client.libero.record_demos", "vla-record-demos", argv, server_side=False)


def render_demos(argv: Sequence[str] | None = None) -> int:
    """``vla-render-demos``: re-render shipped compact demonstrations (``python -m client.libero.render_demos``)."""
    return _run("client.libero.render_demos", "vla-render-demos", argv, server_side=False)


def quant_scan(argv: Sequence[str] | None = None) -> int:
    """``vla-quant-scan``: DuQuant dry run, the layers that would be quantised (``python -m quant.scan``)."""
    return _run("quant.scan", "vla-quant-scan", argv)


def train(argv: Sequence[str] | None = None) -> int:
    """``vla-train STAGE [flags]``: one entry for every trainer; ``vla-train --help`` lists the stages."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {name:12s} {desc}" for name, (_, desc) in TRAINERS.items()]
        out = sys.stdout if argv else sys.stderr
        out.write("usage: vla-train STAGE [flags]   (vla-train STAGE --help for its flags)\nstages:\n"
                  + "\n".join(lines) + "\n")
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage not in TRAINERS:
        sys.stderr.write(f"vla-train: unknown stage {stage!r}; expected one of {', '.join(TRAINERS)}\n")
        return 2
    return _run(TRAINERS[stage][0], f"vla-train {stage}", rest)
