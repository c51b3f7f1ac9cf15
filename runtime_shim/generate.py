"""Greedy generation over a loaded program: the data behind ``lazykv generate``.

The library returns a :class:`GenerationResult` and calls ``progress(done, total)``;
it prints nothing (mlx-lm's ``GenerationResponse``/``prompt_progress_callback``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, List, Optional

import torch

from lazykv.errors import InvalidInput, UnknownMethod

ProgressFn = Callable[[int, int], None]


@dataclasses.dataclass
class GenerationResult:
    """Tokens and memory of one ``generate`` run (bytes summed over all sessions)."""

    prompts: List[List[int]]
    tokens: List[List[int]]  # generated tokens, one list per session
    kv_bytes_after_load: int
    kv_bytes_after_prefill: int
    kv_bytes_end: int
    peak_kv_bytes: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    bytes_per_position: int
    max_positions: int
    policy: str
    #: (positions filled per session, KV bytes held) after the prefill and each decode step.
    trace: List[tuple] = dataclasses.field(default_factory=list)
    grow_events: int = 0
    bytes_copied: int = 0
    #: With a shared prefix: what computing it once and forking cost, and what computing
    #: it in every session would have (:func:`greedy_generate`).
    shared_prefix: Optional[dict] = None

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.decode_steps * len(self.tokens)
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def as_json(self) -> dict:
        return {
            "kv_bytes_after_load": self.kv_bytes_after_load,
            "kv_bytes_after_prefill": self.kv_bytes_after_prefill,
            "kv_bytes_end": self.kv_bytes_end,
            "peak_kv_bytes": self.peak_kv_bytes,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "tokens": self.tokens[0] if len(self.tokens) == 1 else self.tokens,
            "sessions": len(self.tokens),
            "prompt_len": len(self.prompts[0]),
            "new_tokens": self.decode_steps + 1 if self.tokens[0] else 0,
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
            "bytes_per_position": self.bytes_per_position,
            "max_positions": self.max_positions,
            "policy": self.policy,
            "grow_events": self.grow_events,
            "bytes_copied": self.bytes_copied,
            **({"shared_prefix": self.shared_prefix} if self.shared_prefix is not None else {}),
        }


def vocab_size(program, method: str = "forward", session=None) -> int:
    """``get_vocab_size`` if the program has it (ExecuTorch Llama), else the logits' last dim."""
    if "get_vocab_size" in program.method_names:
        v = program.constant("get_vocab_size")
        return int(v.item() if isinstance(v, torch.Tensor) else v)
    with program.session() as s:
        out = s.run(method, _inputs(program, method, torch.zeros((1, 1), dtype=torch.long), 0))
    return int(out[0].shape[-1])


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


def greedy_generate(
    program,
    prompt_len: int,
    new_tokens: int,
    *,
    sessions: int = 1,
    seed: int = 0,
    method: str = "forward",
    progress: Optional[ProgressFn] = None,
    shared_prefix: int = 0,
    prompt_tokens: Optional[List[int]] = None,
) -> GenerationResult:
    """Prefill a seeded random prompt of ``prompt_len`` tokens in each of ``sessions``
    sessions, then decode ``new_tokens`` greedily, sessions interleaved token by token.

    ``shared_prefix`` = P > 0: every prompt starts with the same P tokens, computed once
    in the first session and forked (:meth:`Session.fork`) into the others, which then
    compute only their own ``prompt_len - P`` tokens. ``result.shared_prefix`` reports
    the prefix's prefill time, the forks' time and copied bytes, and what computing the
    prefix in every session would have cost instead: ``prefill_seconds_unshared_estimate``
    (K x the prefix's measured prefill), ``seconds_saved``, ``positions_saved`` and
    ``bytes_saved`` (KV bytes the other sessions got by copy instead of computing them;
    each session still holds its own copy). Needs a program with lazy KV buffers.

    ``prompt_tokens``: the prompt itself (every session gets it; ``prompt_len`` is then
    its length). ``lazykv_run --prompt-tokens`` takes the same list and prints the same
    tokens.
    """
    if prompt_tokens is not None:
        prompt_tokens = [int(t) for t in prompt_tokens]
        if not prompt_tokens:
            raise InvalidInput("prompt_tokens is empty; give at least one token id")
        prompt_len = len(prompt_tokens)
    if method not in program.method_names:
        raise UnknownMethod(f"{program.source}: no method {method!r}; it has {sorted(program.method_names)}")
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
    if program.lazy and prompt_len + max(new_tokens - 1, 0) > program.max_positions:
        from lazykv.errors import ContextOverflow

        raise ContextOverflow(
            f"prompt {prompt_len} + {new_tokens} new tokens needs "
            f"{prompt_len + new_tokens - 1} positions; {program.source} holds at most "
            f"{program.max_positions}"
        )
    vocab = vocab_size(program, method)
    info = program.method_info(method)
    tok_i = 0
    if program.manifest is not None and program.manifest.fill_rule(method) is not None:
        tok_i = program.manifest.fill_rule(method).length_input
    chunk = info.inputs[tok_i].sizes[1] if info.inputs[tok_i].dynamic else prompt_len
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
        return sum(s.kv_bytes for s in ss)

    peak = kv_after_load = kv()
    trace.append((0, kv_after_load))

    def feed(s, prompt, pos, out=None):
        while pos < prompt.shape[1]:
            piece = prompt[:, pos : pos + chunk].contiguous()
            out = s.run(method, _inputs(program, method, piece, pos))
            pos += piece.shape[1]
        return out

    shared = None
    try:
        nxt = []
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
                out = s.run(method, _inputs(program, method, tok, prompt_len + i))
                generated[k].append(int(out[0].reshape(-1, out[0].shape[-1])[-1].argmax()))
                done += 1
            b = kv()
            peak = max(peak, b)
            trace.append((prompt_len + i + 1, b))
            if progress:
                progress(done, total)
        decode_s = time.perf_counter() - t0
        stats = [s.stats for s in ss]
        return GenerationResult(
            prompts=[p[0].tolist() for p in prompts],
            tokens=generated,
            kv_bytes_after_load=kv_after_load,
            kv_bytes_after_prefill=kv_after_prefill,
            kv_bytes_end=kv(),
            peak_kv_bytes=max(peak, sum(st.peak_bytes for st in stats)),
            prefill_seconds=prefill_s,
            decode_seconds=decode_s,
            decode_steps=steps,
            bytes_per_position=program.bytes_per_position * sessions,
            max_positions=program.max_positions,
            policy=program.policy.spec(),
            trace=trace,
            grow_events=sum(st.grow_events for st in stats),
            bytes_copied=sum(st.bytes_copied for st in stats),
            shared_prefix=shared,
        )
    finally:
        for s in ss:
            s.close()
