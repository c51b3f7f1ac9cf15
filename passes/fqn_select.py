"""Select buffers by fully qualified name (FQN): exact names or ``"re:"`` regexes.

The grammar is torchao's ``FqnToConfig``: a pattern is either an exact FQN
(``"layers.0.attention.kv_cache.k_cache"``) or ``"re:<regex>"`` matched with
:func:`re.fullmatch`. There is no substring matching (ExecuTorch's
``InitializedMutableBufferPass`` matches ``pattern in name`` and stays silent on zero
matches; lazykv does neither). A pattern that matches nothing raises
:class:`lazykv.errors.NoMatchingBuffer` listing the FQNs that were seen.
"""

from __future__ import annotations

import re
from typing import Iterable, List, Optional, Sequence, Set, Tuple, Union

from lazykv.errors import NoMatchingBuffer

Patterns = Optional[Union[str, Sequence[str]]]


def normalize_patterns(patterns: Patterns) -> Optional[Tuple[str, ...]]:
    """``None`` (automatic detection) or a tuple of validated patterns.

    Raises ``ValueError`` on an empty list, a non-string, or an invalid regex: these
    are mistakes in the caller's code, found before anything is exported.
    """
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = (patterns,)
    out = tuple(patterns)
    if not out:
        raise ValueError(
            "buffers=[] selects nothing; pass None to detect KV caches automatically"
        )
    for p in out:
        if not isinstance(p, str) or not p:
            raise ValueError(f"buffer patterns must be non-empty strings, got {p!r}")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"invalid regex in buffer pattern {p!r}: {e}") from None
    return out


def pattern_matches(pattern: str, fqn: str) -> bool:
    """True if ``pattern`` (exact FQN or ``"re:<regex>"``, full match) selects ``fqn``."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], fqn) is not None
    return pattern == fqn


def select_fqns(
    patterns: Sequence[str], fqns: Iterable[str], *, what: str = "mutable buffer"
) -> List[str]:
    """The FQNs of ``fqns`` selected by any of ``patterns``, in their given order.

    Every pattern must match at least one FQN: otherwise :class:`NoMatchingBuffer` names
    the pattern and lists the FQNs seen.
    """
    fqns = list(dict.fromkeys(fqns))
    selected: List[str] = []
    seen: Set[str] = set()
    for p in patterns:
        hits = [f for f in fqns if pattern_matches(p, f)]
        if not hits:
            shown = ", ".join(fqns[:50]) + (" ..." if len(fqns) > 50 else "")
            hint = (
                ""
                if p.startswith("re:")
                else " (patterns are exact FQNs; use 're:<regex>' for a regular expression)"
            )
            raise NoMatchingBuffer(
                f"buffer pattern {p!r} matches no {what}{hint}. "
                f"{what.capitalize()}s seen: [{shown or 'none'}]"
            )
        for h in hits:
            if h not in seen:
                seen.add(h)
                selected.append(h)
    return [f for f in fqns if f in seen]
