"""Click parameter types shared by the commands: sizes and growth policies.

Both are checked while the command line is parsed, before any heavy import or work, so
a typo costs a usage error (exit code 2) at once, not after the model loaded. Neither
imports torch: :mod:`lazykv.units` and :mod:`lazykv.runtime_shim.policy` are light.
"""

from __future__ import annotations

import click

from lazykv.errors import LazyKVError


class SizeType(click.ParamType):
    """A byte size as :func:`lazykv.units.parse_size` reads it (``123``, ``64MiB`` =
    2^26, ``64MB`` = 64,000,000); with ``allow_off``, ``off``/``none`` gives ``"off"``."""

    name = "SIZE"

    def __init__(self, allow_off: bool = False) -> None:
        self.allow_off = allow_off

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        if self.allow_off and str(value).strip().lower() in ("off", "none"):
            return "off"
        from lazykv.units import parse_size

        flag = f"--{param.name.replace('_', '-')}" if param is not None and param.name else "size"
        try:
            return parse_size(value, flag)
        except LazyKVError as e:
            self.fail(str(e), param, ctx)


class PolicyType(click.ParamType):
    """A KV growth policy string, parsed by :func:`lazykv.runtime_shim.policy.parse_policy`."""

    name = "POLICY"

    def convert(self, value, param, ctx):
        from lazykv.runtime_shim.policy import GrowthPolicy, parse_policy

        if isinstance(value, GrowthPolicy):
            return value
        try:
            return parse_policy(value)
        except LazyKVError as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()
SIZE_OR_OFF = SizeType(allow_off=True)
POLICY = PolicyType()

#: The growth policies and their units, for ``--help``.
POLICY_HELP = (
    "KV growth policy: doubling (16 positions, then x2), step:N (chunks of N positions; "
    "default 256), hybrid (hybrid:start=256,linear_after=64MiB,increment=32MiB: start "
    "and double in positions while the whole KV cache is under linear_after bytes, then "
    "grow by increment bytes) or preallocate (the exported bound at once). A position is "
    "one token of KV cache."
)
