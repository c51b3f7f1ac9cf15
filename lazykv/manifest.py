"""The lazykv manifest: the one schema the passes write and the shim, ``inspect`` and
``check`` read.

It is stored in the ``.pte`` as a named-data blob under :data:`MANIFEST_KEY` (UTF-8
JSON). The KV tensors themselves keep ExecuTorch's own marks (``DYNAMIC_UNBOUND``, no
``allocation_info``, FQN in ``extra_tensor_info``); the manifest adds what the runtime
format has no field for: growth axis, bytes per position, and how many positions a call
fills (derived from the graph, never from input names). See ``docs/format.md``.

Reading refuses, by name, a manifest from a newer schema version or another writer:
it is never half-read.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, List, Optional, Tuple

from lazykv.errors import ManifestError
from lazykv.format.scalar_type import BY_DTYPE

#: Named-data key of the manifest blob inside the ``.pte``.
MANIFEST_KEY = "lazykv/manifest"
#: Schema version written by this lazykv; readers refuse anything newer.
MANIFEST_VERSION = 1
#: ``format`` field value; a blob with another value is someone else's.
MANIFEST_FORMAT = "lazykv-manifest"

#: dtypes a lazy buffer may have (torch's names; the shim allocates their storage with
#: torch). Bytes per element come from the one ScalarType table.
LAZY_DTYPES = frozenset({
    "float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64",
    "bool",
})


@dataclasses.dataclass(frozen=True)
class FillRule:
    """How many positions a call of ``method`` fills, read from its user inputs.

    Positions needed after the call = ``inputs[position_input].flatten()[position_index]``
    + ``inputs[length_input].shape[length_axis]``. Input indices count the user's inputs
    only (the method's inputs before lazykv rebinds any KV buffer).
    """

    method: str
    position_input: int
    position_index: int
    length_input: int
    length_axis: int

    def positions_needed(self, inputs: List[Any]) -> int:
        """Positions the KV buffers must hold after running ``method`` on ``inputs``."""
        pos = inputs[self.position_input].reshape(-1)[self.position_index]
        return int(pos) + int(inputs[self.length_input].shape[self.length_axis])


@dataclasses.dataclass(frozen=True)
class LazyBuffer:
    """One KV buffer left out of memory planning.

    ``max_shape`` is the exported upper bound; the tensor grows along ``growth_axis``
    (``max_shape[growth_axis]`` is the max context). ``methods`` lists the methods
    that use the buffer, in the program's method order.
    """

    fqn: str
    dtype: str
    max_shape: Tuple[int, ...]
    growth_axis: int
    methods: Tuple[str, ...]

    def __post_init__(self) -> None:
        if self.dtype not in LAZY_DTYPES:
            raise ManifestError(f"lazy buffer {self.fqn!r}: unknown dtype {self.dtype!r}")
        if not 0 <= self.growth_axis < len(self.max_shape):
            raise ManifestError(
                f"lazy buffer {self.fqn!r}: growth axis {self.growth_axis} is outside "
                f"shape {list(self.max_shape)}"
            )
        if any(d <= 0 for d in self.max_shape):
            raise ManifestError(f"lazy buffer {self.fqn!r}: bad shape {list(self.max_shape)}")

    @property
    def max_positions(self) -> int:
        """The exported upper bound along the growth axis (the max context)."""
        return self.max_shape[self.growth_axis]

    @property
    def bytes_per_position(self) -> int:
        """Bytes one position along the growth axis occupies."""
        n = BY_DTYPE[self.dtype].itemsize
        for i, d in enumerate(self.max_shape):
            if i != self.growth_axis:
                n *= d
        return n

    @property
    def nbytes_at_max(self) -> int:
        """Bytes of the buffer at its exported upper bound."""
        return self.bytes_per_position * self.max_positions

    def shape_at(self, positions: int) -> Tuple[int, ...]:
        """The buffer's shape when it holds ``positions`` positions."""
        shape = list(self.max_shape)
        shape[self.growth_axis] = positions
        return tuple(shape)


@dataclasses.dataclass(frozen=True)
class SharedConstant:
    """A constant known by FQN across methods (written by the constant-sharing pass)."""

    fqn: str
    nbytes: int
    methods: Tuple[str, ...]
    #: Key of the stored bytes (named-data key or delegate constant name), if known.
    storage_key: Optional[str] = None
    #: True when every method's copy points at one stored blob.
    stored_once: bool = True


@dataclasses.dataclass(frozen=True)
class UnmarkedBuffer:
    """A mutable buffer that stays memory planned in a lazy export, and why.

    ``kind`` is ``"kv_cache"`` (a position-indexed cache the proof did not accept: ring
    buffer, masked or cast read...) or ``"state"`` (not a cache: recurrent or convolution
    state, counters). ``cause`` is a short code (``ring``, ``mask``, ``cast``,
    ``dequantize``, ``state``...), ``reason`` the sentence naming the node, ``fix`` what
    would make it lazy (or why nothing needs to).
    """

    fqn: str
    kind: str
    cause: str
    reason: str
    fix: str = ""
    methods: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Everything lazykv records in a ``.pte``. Build it with keyword arguments."""

    lazy_buffers: Tuple[LazyBuffer, ...] = ()
    fill_rules: Tuple[FillRule, ...] = ()
    shared_constants: Tuple[SharedConstant, ...] = ()
    #: Mutable buffers left planned, with the reason (optional field; since lazykv 0.1).
    unmarked_buffers: Tuple[UnmarkedBuffer, ...] = ()
    version: int = MANIFEST_VERSION
    producer: str = ""

    def buffer(self, fqn: str) -> LazyBuffer:
        """The lazy buffer named ``fqn``; ``KeyError`` naming the known ones otherwise."""
        for b in self.lazy_buffers:
            if b.fqn == fqn:
                return b
        raise KeyError(f"no lazy buffer {fqn!r}; known: {[b.fqn for b in self.lazy_buffers]}")

    def fill_rule(self, method: str) -> Optional[FillRule]:
        """The fill rule of ``method``, or None if it touches no lazy buffer."""
        for r in self.fill_rules:
            if r.method == method:
                return r
        return None

    def buffers_of(self, method: str) -> Tuple[LazyBuffer, ...]:
        """Lazy buffers that ``method`` uses."""
        return tuple(b for b in self.lazy_buffers if method in b.methods)

    @property
    def bytes_per_position(self) -> int:
        """Bytes all lazy buffers together need per filled position."""
        return sum(b.bytes_per_position for b in self.lazy_buffers)

    @property
    def kv_bytes_at_max_context(self) -> int:
        return sum(b.nbytes_at_max for b in self.lazy_buffers)

    # -- serialization -----------------------------------------------------------------

    def to_json(self) -> str:
        """The JSON text stored in the ``.pte`` (keys sorted: same manifest, same bytes)."""
        d = {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "producer": self.producer,
            "lazy_buffers": [
                {
                    "fqn": b.fqn,
                    "dtype": b.dtype,
                    "max_shape": list(b.max_shape),
                    "growth_axis": b.growth_axis,
                    "bytes_per_position": b.bytes_per_position,
                    "methods": list(b.methods),
                }
                for b in self.lazy_buffers
            ],
            "fill_rules": [dataclasses.asdict(r) for r in self.fill_rules],
            "shared_constants": [
                {**dataclasses.asdict(c), "methods": list(c.methods)}
                for c in self.shared_constants
            ],
        }
        if self.unmarked_buffers:  # optional: absent when every buffer is lazy or none
            d["unmarked_buffers"] = [
                {**dataclasses.asdict(u), "methods": list(u.methods)}
                for u in self.unmarked_buffers
            ]
        return json.dumps(d, sort_keys=True, indent=None, separators=(",", ":"))

    def to_bytes(self) -> bytes:
        return self.to_json().encode("utf-8")

    @staticmethod
    def from_bytes(data: bytes, source: str = "the .pte") -> "Manifest":
        """Parse a stored manifest, refusing a foreign or newer one by name.

        Raises :class:`ManifestError` naming ``source`` and the problem; never returns a
        partly-read manifest.
        """
        try:
            d = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(
                f"{source}: the lazykv manifest is not valid JSON ({e}); re-export the "
                f"program with lazykv"
            ) from None
        if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
            raise ManifestError(
                f"{source}: the blob under {MANIFEST_KEY!r} is not a lazykv manifest "
                f"(format={d.get('format') if isinstance(d, dict) else type(d).__name__!r})"
            )
        version = d.get("version")
        if not isinstance(version, int) or version < 1:
            raise ManifestError(f"{source}: lazykv manifest has no valid version ({version!r})")
        if version > MANIFEST_VERSION:
            raise ManifestError(
                f"{source}: lazykv manifest version {version} was written by a newer lazykv "
                f"({d.get('producer') or 'unknown'}); this lazykv reads up to version "
                f"{MANIFEST_VERSION}. Upgrade lazykv to run this program."
            )
        try:
            buffers = []
            for b in d["lazy_buffers"]:
                lb = LazyBuffer(
                    fqn=str(b["fqn"]),
                    dtype=str(b["dtype"]),
                    max_shape=tuple(int(x) for x in b["max_shape"]),
                    growth_axis=int(b["growth_axis"]),
                    methods=tuple(str(m) for m in b["methods"]),
                )
                if int(b["bytes_per_position"]) != lb.bytes_per_position:
                    raise ManifestError(
                        f"{source}: lazy buffer {lb.fqn!r} records "
                        f"{b['bytes_per_position']} bytes per position but its shape and "
                        f"dtype give {lb.bytes_per_position}"
                    )
                buffers.append(lb)
            rules = tuple(
                FillRule(
                    method=str(r["method"]),
                    position_input=int(r["position_input"]),
                    position_index=int(r["position_index"]),
                    length_input=int(r["length_input"]),
                    length_axis=int(r["length_axis"]),
                )
                for r in d["fill_rules"]
            )
            consts = tuple(
                SharedConstant(
                    fqn=str(c["fqn"]),
                    nbytes=int(c["nbytes"]),
                    methods=tuple(str(m) for m in c["methods"]),
                    storage_key=c.get("storage_key"),
                    stored_once=bool(c.get("stored_once", True)),
                )
                for c in d.get("shared_constants", [])
            )
            unmarked = tuple(
                UnmarkedBuffer(
                    fqn=str(u["fqn"]),
                    kind=str(u["kind"]),
                    cause=str(u["cause"]),
                    reason=str(u["reason"]),
                    fix=str(u.get("fix", "")),
                    methods=tuple(str(m) for m in u.get("methods", ())),
                )
                for u in d.get("unmarked_buffers", [])
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(
                f"{source}: lazykv manifest is malformed ({type(e).__name__}: {e}); "
                f"re-export the program with lazykv"
            ) from None
        m = Manifest(
            lazy_buffers=tuple(buffers),
            fill_rules=rules,
            shared_constants=consts,
            unmarked_buffers=unmarked,
            version=version,
            producer=str(d.get("producer", "")),
        )
        m.validate(source)
        return m

    def validate(self, source: str = "the .pte") -> None:
        """Check internal consistency; raise :class:`ManifestError` naming the problem."""
        seen = set()
        for b in self.lazy_buffers:
            if b.fqn in seen:
                raise ManifestError(f"{source}: lazy buffer {b.fqn!r} is listed twice")
            seen.add(b.fqn)
            for m in b.methods:
                if self.fill_rule(m) is None:
                    raise ManifestError(
                        f"{source}: method {m!r} uses lazy buffer {b.fqn!r} but the manifest "
                        f"has no fill rule for it"
                    )
        for r in self.fill_rules:
            for name in ("position_input", "position_index", "length_input", "length_axis"):
                if getattr(r, name) < 0:
                    raise ManifestError(
                        f"{source}: fill rule of {r.method!r} has negative {name}"
                    )


def producer_string() -> str:
    """``lazykv <version>``: recorded in every manifest this lazykv writes."""
    from lazykv import __version__

    return f"lazykv {__version__}"
