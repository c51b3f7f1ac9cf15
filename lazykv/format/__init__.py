"""The ``.pte`` format layer: torch-free, ExecuTorch-free, at the bottom of lazykv.

Modules (import the one you need; this package imports nothing itself, so that
:mod:`lazykv.manifest` can use the dtype table without a cycle):

* :mod:`~lazykv.format.flatbuffer`: the one bounds-checked flatbuffer table reader;
* :mod:`~lazykv.format.schema`: slot numbers and enums of ``program.fbs``;
* :mod:`~lazykv.format.scalar_type`: the one ScalarType table;
* :mod:`~lazykv.format.header`: file identifier and extended header;
* :mod:`~lazykv.format.program`: the program model (:func:`read_program`);
* :mod:`~lazykv.format.pte`: :func:`open_pte` and :class:`PteFile`;
* :mod:`~lazykv.format.rebind`: the one rebinding edit (lazy KV tensors -> inputs).

The lazykv manifest (:mod:`lazykv.manifest`) belongs to this layer too.
"""
