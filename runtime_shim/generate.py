"""Greedy generation over a loaded program: the data behind ``lazykv generate``.

The library returns a :class:`GenerationResult` and calls ``progress(done, total)``;
it prints nothing (mlx-lm's ``GenerationResponse``/``prompt_progress_callback``).

Which methods run: ``forward`` for both the prompt and the new tokens when the program
has it; otherwise, for a program with ``prefill`` and ``decode`` (``lazykv export
--methods prefill,decode``), the prompt goes through ``prefill`` and each new token
through ``decode``. ``method=`` picks one method for both, or a ``(prefill, decode)``
pair. A method whose token input is static takes its tokens in chunks of that size
(``decode``: one at a time).

KV bytes are counted the same way as ``lazykv inspect`` does: a program's *planned*
KV caches (static exports) are held from load on, once for the program and shared by its
sessions (:func:`kv_figures`); lazy KV storage is each session's own. Totals are planned
+ every session's lazy storage.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from lazykv.errors import ContextOverflow, InvalidInput, UnknownMethod

ProgressFn = Callable[[int, int], None]

#: Version of :meth:`GenerationResult.as_json`'s document (bump on any incompatible change).
JSON_SCHEMA = "lazykv-generate"
JSON_VERSION = 1


@dataclasses.dataclass(frozen=True)
class KVFigures:
    """KV cache bytes of a program, as ``lazykv inspect`` reports them.

    ``planned_bytes``: static KV caches, allocated in the planned arena when the program
    loads and shared by its sessions. ``at_max_context``: every KV cache at its upper
    bound (what a static export would hold). ``bytes_per_position``: lazy bytes one
    position costs a session."""

    planned_bytes: int
    at_max_context: int
    bytes_per_position: int


def kv_figures(program) -> KVFigures:
    """:class:`KVFigures` of a loaded program (reads its program flatbuffer once, from
    its file or the bytes it was loaded from)."""
    from lazykv.format.buffers import buffer_report, kv_buffers
    from lazykv.format.pte import open_pte

    with open_pte(program._data_source) as pte:  # the same classification as ``lazykv inspect``
        kv = kv_buffers(buffer_report(pte.program, pte.manifest))
    at_max = sum(b["nbytes"] for b in kv)
    return KVFigures(
        planned_bytes=at_max - sum(b["nbytes"] for b in kv if b["lazy"]),
        at_max_context=at_max,
        bytes_per_position=program.bytes_per_position,
    )


@dataclasses.dataclass
class SessionResult:
    """One session of a ``generate`` run. Byte figures are the session's own (lazy) KV
    storage; ``grows`` counts enlargements of that storage (all buffers at once count
    once), ``buffer_grow_events`` the allocator's events (one per buffer)."""

    prompt: List[int]
    tokens: List[int]
    positions_filled: int
    kv_bytes_after_prefill: int
    kv_bytes_end: int
    peak_kv_bytes: int
    grows: int
    buffer_grow_events: int
    bytes_copied: int

    def as_json(self, index: int) -> dict:
        return {"index": index, **dataclasses.asdict(self)}


@dataclasses.dataclass
class GenerationResult:
    """Tokens and memory of one ``generate`` run: per-session figures plus totals.

    ``kv_bytes_*`` are totals: the program's planned KV bytes plus every session's lazy
    KV storage at that moment."""

    sessions: List[SessionResult]
    prefill_method: str
    decode_method: str
    planned_kv_bytes: int
    kv_bytes_at_max_context: int
    kv_bytes_after_load: int
    kv_bytes_after_prefill: int
    kv_bytes_end: int
    peak_kv_bytes: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    #: Lazy KV bytes one position costs one session.
    bytes_per_position: int
    max_positions: int
    policy: str
    lazy: bool
    source: str = ""
    #: (positions filled per session, total KV bytes) after the prefill and each decode step.
    trace: List[tuple] = dataclasses.field(default_factory=list)
    #: With a shared prefix: what computing it once and forking cost, and what computing
    #: it in every session would have (:func:`greedy_generate`); None without one.
    shared_prefix: Optional[dict] = None

    @property
    def tokens(self) -> List[List[int]]:
        """Generated tokens, one list per session."""
        return [s.tokens for s in self.sessions]

    @property
    def prompts(self) -> List[List[int]]:
        return [s.prompt for s in self.sessions]

    @property
    def grows(self) -> int:
        return sum(s.grows for s in self.sessions)

    @property
    def bytes_copied(self) -> int:
        return sum(s.bytes_copied for s in self.sessions)

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.decode_steps * len(self.sessions)
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def as_json(self) -> dict:
        """The ``lazykv generate --json`` document (schema ``lazykv-generate`` version 1)::

            {"schema": "lazykv-generate", "version": 1, "program": str, "lazy": bool,
             "policy": str, "methods": {"prefill": str, "decode": str},
             "prompt_len": int, "new_tokens": int, "max_positions": int,
             "bytes_per_position": int,          # lazy KV bytes per position, one session
             "planned_kv_bytes": int,            # static KV, held from load, shared
             "kv_bytes_at_max_context": int,     # all KV caches at their bound, one program
             "sessions": [{"index", "prompt", "tokens", "positions_filled",
                           "kv_bytes_after_prefill", "kv_bytes_end", "peak_kv_bytes",
                           "grows", "buffer_grow_events", "bytes_copied"}, ...],
             "totals": {"sessions", "kv_bytes_after_load", "kv_bytes_after_prefill",
                        "kv_bytes_end", "peak_kv_bytes", "grows", "bytes_copied",
                        "prefill_seconds", "decode_seconds", "decode_tokens",
                        "decode_tokens_per_s"},
             "shared_prefix": null | {"positions", "prefill_seconds", "fork_seconds",
                                      "bytes_copied", "prefill_seconds_unshared_estimate",
                                      "seconds_saved", "positions_saved", "bytes_saved"}}

        Every key is always present with the same type, whatever the number of sessions.
        Totals' KV bytes = ``planned_kv_bytes`` + the sessions' own (lazy) bytes.
        """
        tps = self.decode_tokens_per_s
        return {
            "schema": JSON_SCHEMA,
            "version": JSON_VERSION,
            "program": self.source,
            "lazy": self.lazy,
            "policy": self.policy,
            "methods": {"prefill": self.prefill_method, "decode": self.decode_method},
            "prompt_len": len(self.sessions[0].prompt),
            "new_tokens": len(self.sessions[0].tokens),
            "max_positions": self.max_positions,
            "bytes_per_position": self.bytes_per_position,
            "planned_kv_bytes": self.planned_kv_bytes,
            "kv_bytes_at_max_context": self.kv_bytes_at_max_context,
            "sessions": [s.as_json(i) for i, s in enumerate(self.sessions)],
            "totals": {
                "sessions": len(self.sessions),
                "kv_bytes_after_load": self.kv_bytes_after_load,
                "kv_bytes_after_prefill": self.kv_bytes_after_prefill,
                "kv_bytes_end": self.kv_bytes_end,
                "peak_kv_bytes": self.peak_kv_bytes,
                "grows": self.grows,
                "bytes_copied": self.bytes_copied,
                "prefill_seconds": self.prefill_seconds,
                "decode_seconds": self.decode_seconds,
                "decode_tokens": self.decode_steps * len(self.sessions),
                "decode_tokens_per_s": None if tps != tps else tps,
            },
            "shared_prefix": self.shared_prefix,
        }


def decoder_methods(program, method: Union[str, Sequence[str], None] = None) -> Tuple[str, str]:
    """``(prefill method, decode method)`` for ``method`` (one name, a pair, or None: see
    the module doc). Raises :class:`UnknownMethod` naming the methods the program has."""
    names = set(program.method_names)
    if method is None:
        if "forward" in names:
            return "forward", "forward"
        if {"prefill", "decode"} <= names:
            return "prefill", "decode"
        raise UnknownMethod(
            f"{program.source}: no method 'forward' and no 'prefill' + 'decode' pair to "
            f"generate with; it has {sorted(names)}. Name one (method=..., --method NAME) "
            f"or a pair (--method PREFILL,DECODE)"
        )
    pair = (method, method) if isinstance(method, str) else tuple(method)
    if len(pair) != 2:
        raise InvalidInput(f"method: give one name or a (prefill, decode) pair, got {method!r}")
    for m in pair:
        if m not in names:
            raise UnknownMethod(f"{program.source}: no method {m!r}; it has {sorted(names)}")
    return pair[0], pair[1]


def vocab_size(program, method: str = "forward", session=None) -> int:
    """``get_vocab_size`` if the program has it (ExecuTorch Llama), else the logits' last dim."""
    if "get_vocab_size" in program.method_names:
        v = program.constant("get_vocab_size")
        return int(v.item() if isinstance(v, torch.Tensor) else v)
    with program.session() as s:
        out = s.run(method, _inputs(program, method, torch.zeros((1, 1), dtype=torch.long), 0))
    return int(out[0].shape[-1])


def _token_input(program, method: str) -> int:
    rule = program.manifest.fill_rule(method) if program.manifest is not None else None
    return rule.length_input if rule is not None else 0


def _inputs(program, method: str, tokens: torch.Tensor, pos: int) -> list:
    """The user inputs of a decoder method for ``tokens`` starting at ``pos``.

    Lazy programs: the manifest's fill rule names the token and position inputs. Others:
    ExecuTorch Llama's ``(tokens [1, S], input_pos [1])``.
    """
    info = program.method_info(method)
    tok_i, pos_i = 0, 1
    if program.manifest is not None and program.manifest.fill_rule(method) is not None:
        r = program.manifest.fill_rule(method)
        tok_i, pos_i = r.length_input, r.position_input
    if len(info.inputs) != 2:
        raise InvalidInput(
            f"generate drives decoders taking (tokens, positions); {method!r} takes "
            f"{len(info.inputs)} inputs"
        )
    spec = info.inputs[pos_i]
    s = tokens.shape[1]
    if len(spec.sizes) == 1 and spec.sizes[0] == 1 and not spec.dynamic:
        p = torch.tensor([pos], dtype=spec.dtype)
    else:  # cache_position-style: one position per token
        p = torch.arange(pos, pos + s, dtype=spec.dtype)
    out = [None, None]
    out[tok_i] = tokens.to(info.inputs[tok_i].dtype)
    out[pos_i] = p
    return out


def _bound(program, method: str) -> Optional[int]:
    """Positions the program's KV cache holds (lazy: the manifest's bound; static: the
    bound the graph gives, when it does)."""
    if program.lazy:
        return program.max_positions
    limits = program.limits.get(method)
    return getattr(limits, "max_positions", None) if limits is not None else None


def _chunk(program, method: str, prompt_len: int) -> int:
    """Tokens per prefill call: up to the dynamic bound, or exactly the static size."""
    spec = program.method_info(method).inputs[_token_input(program, method)]
    if len(spec.sizes) < 2:
        raise InvalidInput(f"{method!r}: its token input is not [1, S] ({spec.describe()})")
    chunk = int(spec.sizes[1])
    if not spec.dynamic and prompt_len % chunk:
        raise InvalidInput(
            f"{method!r} takes exactly {chunk} tokens per call; use a prompt length that is "
            f"a multiple of {chunk}"
        )
    return chunk


def greedy_generate(
    program,
    prompt_len: int,
    new_tokens: int,
    *,
    sessions: int = 1,
    seed: int = 0,
    method: Union[str, Sequence[str], None] = None,
    progress: Optional[ProgressFn] = None,
    shared_prefix: int = 0,
    prompt_tokens: Optional[Sequence[int]] = None,
) -> GenerationResult:
    """Prefill a seeded random prompt of ``prompt_len`` tokens in each of ``sessions``
    sessions, then decode ``new_tokens`` greedily, sessions interleaved token by token.

    ``method``: see :func:`decoder_methods` (default: ``forward``, else ``prefill`` then
    ``decode``). Raises :class:`UnknownMethod`, :class:`InvalidInput` or
    :class:`ContextOverflow` before any session runs.

    ``prompt_tokens``: the prompt itself (every session gets it; ``prompt_len`` is then
    its length). ``lazykv_run --prompt-tokens`` takes the same list and prints the same
    tokens.

    ``shared_prefix`` = P > 0: every prompt starts with the same P tokens, computed once
    in the first session and forked (:meth:`Session.fork`) into the others, which then
    compute only their own ``prompt_len - P`` tokens. ``result.shared_prefix`` reports
    the prefix's prefill time, the forks' time and copied bytes, and what computing the
    prefix in every session would have cost instead: ``prefill_seconds_unshared_estimate``
    (K x the prefix's measured prefill), ``seconds_saved``, ``positions_saved`` and
    ``bytes_saved`` (KV bytes the other sessions got by copy instead of computing them;
    each session still holds its own copy). Needs a program with lazy KV buffers.
    """
    prefill_m, decode_m = decoder_methods(program, method)
    if prompt_tokens is not None:
        prompt_tokens = [int(t) for t in prompt_tokens]
        if not prompt_tokens:
            raise InvalidInput("prompt_tokens is empty; give at least one token id")
        prompt_len = len(prompt_tokens)
    if prompt_len < 1 or new_tokens < 0 or sessions < 1:
        raise InvalidInput(
            f"need prompt_len >= 1, new_tokens >= 0, sessions >= 1; got {prompt_len}, "
            f"{new_tokens}, {sessions}"
        )
    if not 0 <= shared_prefix <= prompt_len:
        raise InvalidInput(
            f"shared_prefix must be from 0 to prompt_len ({prompt_len}); got {shared_prefix}"
        )
    if shared_prefix and not program.lazy:
        raise InvalidInput(
            f"{program.source} has no lazy KV buffers: its sessions cannot be forked to share "
            f"a prefix; drop --shared-prefix or export with --lazy-kv-cache"
        )
    need, bound = prompt_len + max(new_tokens - 1, 0), _bound(program, prefill_m)
    if bound is not None and need > bound:
        raise ContextOverflow(
            f"a prompt of {prompt_len} + {new_tokens} new tokens needs {need} positions; "
            f"{program.source} holds at most {bound}: use a shorter prompt or fewer new "
            f"tokens, or export with a larger max context"
        )
    figures = kv_figures(program)
    planned = figures.planned_bytes
    chunk = _chunk(program, prefill_m, prompt_len)
    vocab = vocab_size(program, decode_m)
    gen = torch.Generator().manual_seed(seed)
    if prompt_tokens is not None:
        bad = [t for t in prompt_tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidInput(
                f"prompt token {bad[0]} is outside the vocabulary [0, {vocab}) of {program.source}"
            )
        prompts = [torch.tensor([prompt_tokens], dtype=torch.long) for _ in range(sessions)]
    elif shared_prefix:
        head = torch.randint(0, vocab, (1, shared_prefix), generator=gen)
        prompts = [torch.cat([head, torch.randint(0, vocab, (1, prompt_len - shared_prefix), generator=gen)], 1)
                   for _ in range(sessions)]
    else:
        prompts = [torch.randint(0, vocab, (1, prompt_len), generator=gen) for _ in range(sessions)]
    ss = [program.session() for _ in range(1 if shared_prefix else sessions)]
    total = sessions * (1 + max(new_tokens - 1, 0))
    done = 0
    trace = []

    def kv():
        return planned + sum(s.kv_bytes for s in ss)

    peak = kv_after_load = kv()
    trace.append((0, kv_after_load))

    def feed(s, prompt, pos, out=None):
        while pos < prompt.shape[1]:
            piece = prompt[:, pos : pos + chunk].contiguous()
            out = s.run(prefill_m, _inputs(program, prefill_m, piece, pos))
            pos += piece.shape[1]
        return out

    shared = None
    try:
        nxt, after_prefill = [], []
        t0 = time.perf_counter()
        head_out = None
        if shared_prefix:
            head_out = feed(ss[0], prompts[0][:, :shared_prefix], 0)
            t_head = time.perf_counter() - t0
            t1 = time.perf_counter()
            for _ in range(sessions - 1):
                ss.append(ss[0].fork())
            t_fork = time.perf_counter() - t1
            kv_prefix = shared_prefix * program.bytes_per_position
            shared = {
                "positions": shared_prefix,
                "prefill_seconds": t_head,
                "fork_seconds": t_fork,
                "bytes_copied": (sessions - 1) * kv_prefix,
                "prefill_seconds_unshared_estimate": sessions * t_head,
                "seconds_saved": (sessions - 1) * t_head - t_fork,
                "positions_saved": (sessions - 1) * shared_prefix,
                "bytes_saved": (sessions - 1) * kv_prefix,
            }
        for s, prompt in zip(ss, prompts):
            out = feed(s, prompt, shared_prefix, head_out)
            nxt.append(int(out[0].reshape(-1, out[0].shape[-1])[-1].argmax()))
            after_prefill.append(s.kv_bytes)
            if sessions == 1:
                trace.append((prompt_len, kv()))
            done += 1
            peak = max(peak, kv())
            if progress:
                progress(done, total)
        prefill_s = time.perf_counter() - t0
        kv_after_prefill = kv()
        if sessions > 1:
            trace.append((prompt_len, kv_after_prefill))
        generated = [[t] for t in nxt] if new_tokens > 0 else [[] for _ in ss]
        steps = max(new_tokens - 1, 0)
        t0 = time.perf_counter()
        for i in range(steps):
            for k, s in enumerate(ss):
                tok = torch.tensor([[generated[k][-1]]], dtype=torch.long)
                out = s.run(decode_m, _inputs(program, decode_m, tok, prompt_len + i))
                generated[k].append(int(out[0].reshape(-1, out[0].shape[-1])[-1].argmax()))
                done += 1
            b = kv()
            peak = max(peak, b)
            trace.append((prompt_len + i + 1, b))
            if progress:
                progress(done, total)
        decode_s = time.perf_counter() - t0
        results = []
        for s, prompt, toks, kv_pre in zip(ss, prompts, generated, after_prefill):
            st = s.stats
            results.append(SessionResult(
                prompt=prompt[0].tolist(), tokens=toks, positions_filled=s.offset,
                kv_bytes_after_prefill=kv_pre, kv_bytes_end=s.kv_bytes,
                peak_kv_bytes=st.peak_bytes, grows=st.grows,
                buffer_grow_events=st.grow_events, bytes_copied=st.bytes_copied,
            ))
        return GenerationResult(
            sessions=results,
            prefill_method=prefill_m,
            decode_method=decode_m,
            planned_kv_bytes=planned,
            kv_bytes_at_max_context=figures.at_max_context,
            kv_bytes_after_load=kv_after_load,
            kv_bytes_after_prefill=kv_after_prefill,
            kv_bytes_end=kv(),
            peak_kv_bytes=max(peak, planned + sum(r.peak_kv_bytes for r in results)),
            prefill_seconds=prefill_s,
            decode_seconds=decode_s,
            decode_steps=steps,
            bytes_per_position=program.bytes_per_position,
            max_positions=program.max_positions,
            policy=program.policy.spec(),
            lazy=bool(program.lazy),
            source=str(program.source),
            trace=trace,
            shared_prefix=shared,
        )
    finally:
        for s in ss:
            s.close()
