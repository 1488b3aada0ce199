"""Dry-run scan: list the layers DuQuant would replace, without weights (``python -m quant.scan``).

``--policy demo-gr00t|demo-openvla`` scans a small tree with the real module names instead (no checkpoint).
The CLI builds the architecture on the meta device through ``models.build_for_scan(policy, model_path)`` (owned by
``models/``; imported lazily so ``quant`` works without it) and prints one
``[GR00T-DUQUANT][DRYRUN] <name>: Linear(in->out) W4 A8 ...`` line per selected layer and the total.
Without ``--model-path``, ``gr00t`` and ``openvla-rsd`` scan the checkpoints shipped in ``models/checkpoints``
(``models.shipped_checkpoint``), so ``./test_duquant_dryrun.sh`` alone lists the shipped GR00T N1.5.

This is the one place the dry run happens: ``python -m server`` with ``GR00T_DUQUANT_DRYRUN=1`` hands over to
:func:`main` instead of serving.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from torch import nn

from quant.config import DuQuantConfig, DuQuantConfigError
from quant.replace import scan_model

__all__ = ["main", "scan_model"]

LOG = logging.getLogger("quant")

POLICIES = ("gr00t", "openvla", "openvla-rsd", "openvla-oft", "demo-gr00t", "demo-openvla")


def _build(policy: str, model_path: str | None) -> nn.Module:
    if policy.startswith("demo-"):
        # Small trees with the real module names (quant.testing), built on the meta device: no models/ needed.
        import torch

        from quant.testing import gr00t_like, openvla_like

        with torch.device("meta"):
            return gr00t_like() if policy == "demo-gr00t" else openvla_like()
    try:
        import models  # noqa: F401
        from models import build_for_scan  # type: ignore[attr-defined]
    except ImportError as exc:
        raise SystemExit(
            f"quant.scan: cannot build the {policy!r} architecture: models.build_for_scan is not available ({exc}). "
            "It is provided by the models/ package; until then use quant.scan_model(model, config) on a model you "
            "built yourself."
        ) from None
    return build_for_scan(policy, model_path)


def _shipped_model_path(policy: str) -> str | None:
    """The checkpoint shipped for ``policy`` (``gr00t``, ``openvla-rsd``), or ``None`` when none is."""
    import models

    names = {"gr00t": models.EMBEDDED_GR00T, "openvla-rsd": models.EMBEDDED_OPENVLA_RSD}
    return str(models.shipped_checkpoint(names[policy])) if policy in names else None


def kept_lines(model: nn.Module, listed: list[str]) -> list[str]:
    """``[GR00T-DUQUANT][DRYRUN][KEPT]`` lines for the Linears under the model's ``DRYRUN_REPORT_PREFIXES`` (e.g.
    the OpenVLA-OFT action head and proprio projector) that the selection left in floating point, so the listing
    says what happens to them either way."""
    prefixes = tuple(getattr(model, "DRYRUN_REPORT_PREFIXES", ()))
    if not prefixes:
        return []
    selected = {ln.split()[1].rstrip(":") for ln in listed if ln.startswith("[GR00T-DUQUANT][DRYRUN] ")}
    return [f"[GR00T-DUQUANT][DRYRUN][KEPT] {name}: Linear({m.in_features}->{m.out_features}) kept in floating "
            "point (not selected; add it with GR00T_DUQUANT_INCLUDE)"
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith(prefixes) and name not in selected]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: prints the dry-run listing; exit 0 on success, 2 on a configuration error."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", "--model_path", dest="model_path", default=None,
                    help="checkpoint directory (default for gr00t / openvla-rsd: the checkpoint shipped in models/)")
    ap.add_argument("--policy", choices=POLICIES, default="gr00t")
    ap.add_argument("--debug", action="store_true", help="also log every Linear and why it was (not) selected")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    env = dict(os.environ)
    if args.debug:
        env["GR00T_DUQUANT_DEBUG"] = "1"
    try:
        cfg = DuQuantConfig.from_env(env, policy=args.policy)
    except DuQuantConfigError as exc:
        print(f"quant.scan: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.model_path is None and not args.policy.startswith("demo-"):
        args.model_path = _shipped_model_path(args.policy)
        if args.model_path is None:
            print(f"quant.scan: --policy {args.policy} needs --model-path DIR (no checkpoint of it is shipped)",
                  file=sys.stderr)
            return 2
    try:
        model = _build(args.policy, args.model_path)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one clear line, not a traceback
        print(f"quant.scan: cannot build the {args.policy!r} architecture from {args.model_path!r}: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    try:
        lines = scan_model(model, cfg)
    except DuQuantConfigError as exc:
        print(f"quant.scan: configuration error: {exc}", file=sys.stderr)
        return 2
    lines[-1:-1] = kept_lines(model, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
