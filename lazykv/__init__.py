"""lazykv: pay-as-you-go memory for ExecuTorch programs.

Subpackages: :mod:`lazykv.passes` (export-time passes), :mod:`lazykv.runtime_shim`
(loading on the stock runtime with growable KV storage), :mod:`lazykv.cli`.
"""

__version__ = "0.1.0"
