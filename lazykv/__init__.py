"""lazykv: pay-as-you-go memory for ExecuTorch programs.

Subpackages: :mod:`lazykv.passes` (export-time passes), :mod:`lazykv.runtime_shim`
(loading on the stock runtime with growable KV storage), :mod:`lazykv.cli`; under them
:mod:`lazykv.verify` (checks before bytes reach ExecuTorch's C++) and
:mod:`lazykv.format` (the ``.pte`` format, torch-free). ``docs/architecture.md`` maps
the layers.
"""

__version__ = "0.1.0"
