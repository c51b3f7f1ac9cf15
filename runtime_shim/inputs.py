"""One description of each method's inputs, and the two ways a call is checked against it.

:class:`MethodInfo` says what a method takes (:class:`InputSpec` per user input), which
inputs are token ids (and their vocabulary), which give the start position and the
number of positions a call fills (:class:`lazykv.manifest.FillRule`: the manifest's for
a lazy method, the graph's for a static one) and the most positions it can hold. Both
checks below are derived from it, side by side, so they cannot drift apart:

* :meth:`MethodInfo.check`: the full checks, raising :class:`lazykv.errors.InvalidInput`
  or :class:`ContextOverflow` with a message that names the input and the fix. A KV
  tensor of the wrong shape aborts the process in C++ (DESIGN fact 5) and a negative
  position divides by zero in ``custom_sdpa``, so nothing reaches the runtime unchecked.
* :class:`FastCall`: the same checks precomputed for the repeated calls of one session
  (a decode loop): about 2 us of Python instead of ~20 us, and no time for XNNPACK's
  thread pool to fall asleep between two runtime calls (benchmarks, ``decode`` case).
  It only ever accepts a subset of what :meth:`MethodInfo.check` accepts: anything it is
  not sure of makes :meth:`FastCall.positions_after` return 0 and the session runs the
  full checks, which raise with their messages. ``tests/test_inputs.py`` drives both
  with the same inputs and asserts exactly that.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional, Sequence, Set, Tuple

import torch

from lazykv.errors import ContextOverflow, InvalidInput
from lazykv.manifest import FillRule

_Tensor = torch.Tensor
_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
#: Shapes a fast path remembers per dynamic input (a decode step and a few prefill lengths).
_MAX_SHAPES = 64


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What one user input of a method must look like (from the program flatbuffer)."""

    index: int
    kind: str  # "tensor", "int", "float", "bool", "other"
    dtype: Optional[torch.dtype] = None
    sizes: Tuple[int, ...] = ()
    dynamic: bool = False

    def describe(self) -> str:
        """``int64[1x128] (dims up to these)``: what the input must be, for messages."""
        if self.kind != "tensor":
            return self.kind
        dims = "x".join(str(d) for d in self.sizes)
        return f"{str(self.dtype).replace('torch.', '')}[{dims}]" + (
            " (dims up to these)" if self.dynamic else ""
        )

    def as_dict(self) -> dict:
        """A JSON-ready dict (the dtype by name; :meth:`from_dict` reads it back)."""
        d = dataclasses.asdict(self)
        d["dtype"] = None if self.dtype is None else str(self.dtype).replace("torch.", "")
        d["sizes"] = list(self.sizes)
        return d

    @staticmethod
    def from_dict(d: dict) -> "InputSpec":
        """The :class:`InputSpec` of a dict made by :meth:`as_dict`."""
        dt = d.get("dtype")
        return InputSpec(
            index=int(d["index"]),
            kind=str(d["kind"]),
            dtype=None if dt is None else getattr(torch, str(dt)),
            sizes=tuple(int(x) for x in d.get("sizes", ())),
            dynamic=bool(d.get("dynamic", False)),
        )


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    """A method as the shim sees it: its user inputs and what they must respect.

    ``lazy_fqns``: the lazy buffers the session appends after the user's inputs, in
    order. ``tokens``: ``(input index, vocabulary size)`` of each token-id input.
    ``positions``: which inputs give the start position and the length of a call (None:
    the method fills no positions). ``bound``: the most positions it can hold (None:
    unknown).
    """

    name: str
    inputs: Tuple[InputSpec, ...]
    lazy_fqns: Tuple[str, ...] = ()
    tokens: Tuple[Tuple[int, int], ...] = ()
    positions: Optional[FillRule] = None
    bound: Optional[int] = None

    @property
    def uses_lazy(self) -> bool:
        """The session passes KV storage after the user's inputs."""
        return bool(self.lazy_fqns)

    def describe_inputs(self) -> str:
        """Every input described (:meth:`InputSpec.describe`), for messages."""
        return ", ".join(s.describe() for s in self.inputs) or "no inputs"

    # -- the full checks -----------------------------------------------------------------

    def check(self, inputs, filled: int) -> Tuple[list, Optional[int]]:
        """``(inputs as a list, positions filled after the call)`` for a call of this
        method on ``inputs`` in a session that has filled ``filled`` positions; the
        positions are None when the method fills none. Raises :class:`InvalidInput`
        (kind, dtype, shape, device, layout, token ids, positions that do not continue the
        session) or :class:`ContextOverflow` (past :attr:`bound`), naming the input."""
        method = self.name
        if isinstance(inputs, torch.Tensor) or not isinstance(inputs, (list, tuple)):
            raise InvalidInput(
                f"{method}: inputs must be a list of the method's inputs "
                f"({self.describe_inputs()}), got {type(inputs).__name__}"
            )
        inputs = list(inputs)
        self._check_each(inputs)
        self._check_tokens(inputs)
        if self.positions is None:
            return inputs, None
        return inputs, self._check_positions(inputs, filled)

    def _check_each(self, inputs: list) -> None:
        method = self.name
        if len(inputs) != len(self.inputs):
            raise InvalidInput(
                f"{method} takes {len(self.inputs)} input(s) ({self.describe_inputs()}), got "
                f"{len(inputs)}"
                + ("; pass the user inputs only, the session supplies the KV cache"
                   if self.uses_lazy else "")
            )
        for spec, x in zip(self.inputs, inputs):
            where = f"{method}: input {spec.index}"
            if spec.kind == "tensor":
                if not isinstance(x, torch.Tensor):
                    raise InvalidInput(f"{where} must be a tensor {spec.describe()}, got {type(x).__name__}")
                if spec.dtype is not None and x.dtype != spec.dtype:
                    raise InvalidInput(f"{where} must be {spec.describe()}, got dtype {x.dtype}")
                if x.dim() != len(spec.sizes):
                    raise InvalidInput(
                        f"{where} must have {len(spec.sizes)} dims ({spec.describe()}), got shape "
                        f"{list(x.shape)}"
                    )
                if spec.dynamic:
                    if any(d > m for d, m in zip(x.shape, spec.sizes)):
                        raise InvalidInput(f"{where} must be {spec.describe()}, got shape {list(x.shape)}")
                elif tuple(x.shape) != spec.sizes:
                    raise InvalidInput(f"{where} must be {spec.describe()}, got shape {list(x.shape)}")
                if x.device.type != "cpu":
                    raise InvalidInput(f"{where} must be on the CPU, got {x.device}")
                if not x.is_contiguous():
                    raise InvalidInput(f"{where} must be contiguous; call .contiguous() first")
                if x.requires_grad:
                    raise InvalidInput(f"{where} requires grad; pass x.detach()")
            elif spec.kind == "int":
                if isinstance(x, bool) or not isinstance(x, int):
                    raise InvalidInput(f"{where} must be an int, got {type(x).__name__}")
            elif spec.kind == "float":
                if not isinstance(x, (int, float)) or isinstance(x, bool):
                    raise InvalidInput(f"{where} must be a float, got {type(x).__name__}")
            elif spec.kind == "bool":
                if not isinstance(x, bool):
                    raise InvalidInput(f"{where} must be a bool, got {type(x).__name__}")

    def _check_tokens(self, inputs: list) -> None:
        """Token ids must index the embedding table: the runtime refuses others only after
        a kernel fails mid-call."""
        for i, vocab in self.tokens:
            if i >= len(inputs) or not isinstance(inputs[i], torch.Tensor):
                continue
            t = inputs[i]
            if t.numel() == 0 or t.dtype.is_floating_point or t.dtype == torch.bool:
                continue
            if t.numel() == 1:  # a decode step: one token, one read
                lo = hi = int(t)
            else:
                lo, hi = (int(v) for v in torch.aminmax(t))
            if lo < 0 or hi >= vocab:
                bad = lo if lo < 0 else hi
                raise InvalidInput(
                    f"{self.name}: input {i} holds token id {bad}, outside the vocabulary "
                    f"[0, {vocab}) of the program's embedding table"
                )

    def _check_positions(self, inputs: list, filled: int) -> int:
        """The positions filled after the call, after checking the call continues the
        session and stays inside :attr:`bound`."""
        method, r, bound = self.name, self.positions, self.bound
        pos_t = inputs[r.position_input]
        k = r.position_index
        if not isinstance(pos_t, torch.Tensor) or pos_t.numel() <= k:
            raise InvalidInput(
                f"{method}: input {r.position_input} (the start position) must be a tensor "
                f"with at least {k + 1} element(s)"
            )
        if pos_t.dtype.is_floating_point or pos_t.dtype == torch.bool:
            raise InvalidInput(f"{method}: input {r.position_input} (positions) must be integer")
        pos = int(pos_t) if pos_t.numel() == 1 else int(pos_t.reshape(-1)[k])
        length = int(inputs[r.length_input].shape[r.length_axis])
        if length < 1:
            raise InvalidInput(f"{method}: input {r.length_input} holds no positions (length 0)")
        if pos != filled:
            raise InvalidInput(f"{method}: {_position_advice(pos, filled)}")
        need = pos + length
        if bound is not None and need > bound:
            raise ContextOverflow(
                f"{method}: positions {pos}..{need - 1} go past the exported bound of {bound} "
                f"positions ({filled} filled, {bound - filled} left). Trim or reset "
                f"the session, or export with a larger max context"
            )
        return need


def _position_advice(pos: int, filled: int) -> str:
    """Why a call starting at ``pos`` cannot run in a session with ``filled`` positions,
    and what to do instead."""
    if pos < 0:
        return f"call starts at position {pos}; positions are >= 0 (this session has filled {filled})"
    if pos > filled:
        where = "nothing yet" if filled == 0 else f"positions 0..{filled - 1}"
        return (f"call starts at position {pos} but this session has filled {where}; "
                f"positions must continue at {filled} (no gaps): start this call at {filled}")
    return (f"call starts at position {pos} but this session has filled {filled}; positions "
            f"must continue at {filled}: to redo from position {pos}, call trim({filled - pos}) "
            f"first (or reset() to start over)")


# -- the fast path ------------------------------------------------------------------------


class FastCall:
    """:meth:`MethodInfo.check` precomputed for one (session, method), and the runtime
    arguments of the call. Built by :meth:`build`; valid until the session's KV storage
    changes (the session drops it on every grow, shrink and close)."""

    __slots__ = (
        "kv", "limit", "execute", "_dtypes", "_shapes", "_bounds", "_tokens",
        "_pos_input", "_len_input", "_len_axis", "_n",
    )

    def __init__(self, kv: List[_Tensor], limit: int, execute: Callable[[list], list], dtypes,
                 shapes, bounds, tokens, pos_input: int, len_input: int, len_axis: int) -> None:
        self.kv = kv
        self.limit = limit
        self.execute = execute
        self._dtypes: Tuple[torch.dtype, ...] = dtypes
        self._shapes: Tuple[Set[Tuple[int, ...]], ...] = shapes
        self._bounds: Tuple[Optional[Tuple[int, ...]], ...] = bounds
        self._tokens: Tuple[Tuple[int, int], ...] = tokens
        self._pos_input = pos_input
        self._len_input = len_input
        self._len_axis = len_axis
        self._n = len(dtypes)

    @staticmethod
    def build(info: MethodInfo, kv: Sequence[_Tensor], capacity: int,
              execute: Callable[[list], list]) -> Optional["FastCall"]:
        """The fast path of a lazy method, or None if its inputs are of a kind it does not
        cover: a non-tensor input, an input of unknown dtype, or a start position that
        is not the only element of an integer tensor of static shape.

        ``kv``: the session's storage for ``info.lazy_fqns``, in order; ``capacity``: the
        positions all of it holds now; ``execute``: runs the loaded method on the user's
        inputs with ``kv`` bound after them
        (:meth:`lazykv.runtime_shim.native_engine.RawMethod.bind`) and returns its
        outputs (the caller holds the program's lock around it).
        """
        rule = info.positions
        if rule is None or not info.lazy_fqns or info.bound is None:
            return None
        dtypes, shapes, bounds = [], [], []
        for spec in info.inputs:
            if spec.kind != "tensor" or spec.dtype is None:
                return None
            dtypes.append(spec.dtype)
            shapes.append(set() if spec.dynamic else {tuple(spec.sizes)})
            bounds.append(tuple(spec.sizes) if spec.dynamic else None)
        n = len(info.inputs)
        pos_spec = info.inputs[rule.position_input] if rule.position_input < n else None
        if (pos_spec is None or pos_spec.dynamic or pos_spec.dtype not in _INTEGER_DTYPES
                or math.prod(pos_spec.sizes) != 1 or rule.position_index != 0
                or rule.length_input >= n
                or rule.length_axis >= len(info.inputs[rule.length_input].sizes)):
            return None
        if any(i >= n for i, _ in info.tokens):
            return None
        return FastCall(
            list(kv), min(capacity, info.bound), execute, tuple(dtypes), tuple(shapes),
            tuple(bounds), info.tokens, rule.position_input, rule.length_input, rule.length_axis,
        )

    def positions_after(self, inputs, filled: int) -> int:
        """Positions filled after running on ``inputs`` if every check of
        :meth:`MethodInfo.check` passes and the storage already holds them; 0 if the full
        checks must decide."""
        cls = inputs.__class__
        if (cls is not list and cls is not tuple) or len(inputs) != self._n:
            return 0
        dtypes, shapes = self._dtypes, self._shapes
        i = 0
        for x in inputs:  # MethodInfo._check_each, in cheap form
            if (x.__class__ is not _Tensor or x.dtype is not dtypes[i] or x.requires_grad
                    or not x.is_cpu or not x.is_contiguous()):
                return 0
            shape = x.shape
            if shape not in shapes[i] and not self._learn_shape(i, shape):
                return 0
            i += 1
        for i, vocab in self._tokens:  # MethodInfo._check_tokens, for a single token
            t = inputs[i]
            if t.numel() != 1:
                return 0  # a prompt: the full checks scan it
            v = t.item()
            if v < 0 or v >= vocab:
                return 0
        if inputs[self._pos_input].item() != filled:  # MethodInfo._check_positions
            return 0
        length = inputs[self._len_input].shape[self._len_axis]
        need = filled + length
        if length < 1 or need > self.limit:
            return 0
        return need

    def _learn_shape(self, i: int, shape) -> bool:
        """Whether ``shape`` fits dynamic input ``i``'s bounds (remembered if so)."""
        bound = self._bounds[i]
        if bound is None or len(shape) != len(bound) or any(d > m for d, m in zip(shape, bound)):
            return False
        if len(self._shapes[i]) < _MAX_SHAPES:
            self._shapes[i].add(tuple(shape))
        return True
