"""Max context vs max prompt chunk: one rule for every exporter lazykv ships.

``max_context`` (``--max-context``) is how many positions the KV cache holds;
``max_seq_len`` (``--max-seq-len``) is the longest chunk of tokens one call takes. A
chunk must fit in the cache, so ``1 <= max_seq_len <= max_context``. Left unset,
``max_seq_len`` is the model's default (:data:`DEFAULT_MAX_SEQ_LEN`) capped at
``max_context``; set explicitly above ``max_context`` it is refused with one message
naming both settings. ``lazykv export``, :class:`lazykv.export.ExportConfig`,
:class:`lazykv.examples.decoder.DecoderConfig` and ``examples/export_example.py`` all
resolve it here.
"""

from __future__ import annotations

from typing import Optional

from lazykv.errors import LazyKVError

#: Longest prompt chunk per call when none is given, by model.
DEFAULT_MAX_SEQ_LEN = {"llama": 128, "example": 64}


class ContextLimitError(LazyKVError, ValueError):
    """``max_seq_len`` and ``max_context`` that cannot go together."""

    exit_code = 2


def resolve_max_seq_len(max_context: int, max_seq_len: Optional[int], model: str) -> int:
    """The longest prompt chunk for a cache of ``max_context`` positions.

    ``max_seq_len=None`` gives ``min(DEFAULT_MAX_SEQ_LEN[model], max_context)``. Raises
    :class:`ContextLimitError` naming ``--max-seq-len``/``max_seq_len`` and
    ``--max-context``/``max_context`` when ``max_context < 2``, ``max_seq_len < 1`` or
    ``max_seq_len > max_context``.
    """
    if int(max_context) < 2:
        raise ContextLimitError(
            f"max context (--max-context / max_context) must be at least 2 positions, got {max_context}"
        )
    if max_seq_len is None:
        return min(DEFAULT_MAX_SEQ_LEN.get(model, 128), int(max_context))
    if not 1 <= int(max_seq_len) <= int(max_context):
        raise ContextLimitError(
            f"max sequence length (--max-seq-len / max_seq_len) {max_seq_len} must be between "
            f"1 and the max context (--max-context / max_context) {max_context}: one call's "
            f"tokens must fit in the KV cache. Lower --max-seq-len to at most {max_context} "
            f"or raise --max-context"
        )
    return int(max_seq_len)
