"""Policy registry and the policies the server can load.

Importing this package registers the built-in policies. Heavy policies (torch models) register a
factory that imports their model code only when the policy is actually created, so ``--help`` and
the debugging policy start in well under a second.
"""

from server.policies import builtin  # noqa: F401,E402  (registers the built-in policies)
from server.policies.base import Policy, PolicyInputError, PolicyOutput
from server.policies.registry import available_policies, create_policy, register_policy

__all__ = ["Policy", "PolicyInputError", "PolicyOutput", "available_policies", "create_policy", "register_policy"]
