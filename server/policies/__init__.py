"""Policy registry and the policies the server can load.

Importing this package registers the built-in policies (``server/policies/builtin.py``: one declaration each,
built by the one factory in ``server/policies/factory.py``). Model-backed policies import torch and their model
code only when the policy is actually created, so ``--help`` and the debugging policy start in well under a
second.
"""

from server.policies import builtin  # noqa: F401  (registers the built-in policies)
from server.policies.base import Policy, PolicyInputError, PolicyOutput
from server.policies.factory import PolicyContext, PolicySpec, build_policy
from server.policies.options import CalibrationOptions, PolicyOptions, parse_options
from server.policies.quantize import DryRunRequested
from server.policies.registry import (
    available_policies,
    create_policy,
    describe_policies,
    policy_spec,
    register_policy,
)

__all__ = [
    "CalibrationOptions", "DryRunRequested", "Policy", "PolicyContext", "PolicyInputError", "PolicyOptions",
    "PolicyOutput", "PolicySpec", "available_policies", "build_policy", "create_policy", "describe_policies",
    "parse_options", "policy_spec", "register_policy",
]
