"""``lazykv check`` rules on real ``.pte`` files: a good and a bad file for every rule.

Single-method programs are the conftest exports (ExecuTorch Llama ``tiny`` and the
example decoder, static and lazy). Multi-method programs are small hand-written models
exported here once per session (no XNNPACK unless said, a few seconds each). The bad
files are real exports too; the two a single export cannot produce (duplicate constant
storage, a manifest that says ``stored_once = false``) are real exports rewritten with
ExecuTorch's own (de)serializer or given a real lazykv manifest.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lazykv.check import Rules, check_file, check_files, dummy_inputs
from lazykv.inspect import inspect_pte

N, H, D, E = 64, 2, 8, 16
KV_BYTES = N * H * D * 4


# -- programs ------------------------------------------------------------------------------


class Toy(torch.nn.Module):
    """update_cache + custom_sdpa over two KV buffers ``kc``/``vc`` [1, N, H, D]."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kc", torch.zeros(1, N, H, D))
        self.register_buffer("vc", torch.zeros(1, N, H, D))
        self.q = torch.nn.Linear(E, E)
        self.k = torch.nn.Linear(E, E)
        self.v = torch.nn.Linear(E, E)

    def forward(self, x, input_pos):
        pos = input_pos[0].item()
        s = x.shape[1]
        q = self.q(x).view(1, s, H, D)
        torch.ops.llama.update_cache(self.k(x).view(1, s, H, D), self.kc, pos)
        torch.ops.llama.update_cache(self.v(x).view(1, s, H, D), self.vc, pos)
        return torch.ops.llama.custom_sdpa(q, self.kc, self.vc, pos, None, 0, True).view(1, s, E)


class ToyWithHistory(Toy):
    """Toy plus one more mutable buffer: memory planning moves ``kc``/``vc``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("hist", torch.zeros(1, 3000))

    def forward(self, x, input_pos):
        out = super().forward(x, input_pos)
        self.hist.add_(1)
        return out


class Wrapped(torch.nn.Module):
    """The same model one level down: its buffers are ``inner.kc``/``inner.vc``."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, input_pos):
        return self.inner(x, input_pos)


class NoKV(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(E, 4 * E)
        self.l2 = torch.nn.Linear(4 * E, E)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


def _ep(model, kind="kv"):
    from torch.export import Dim, export

    if kind == "nokv":
        args, dyn = (torch.randn(1, 32, E),), None
    else:
        args, dyn = (torch.randn(1, 4, E), torch.tensor([0])), ({1: Dim("S", min=1, max=32)}, None)
    with torch.no_grad():
        return export(model, args, dynamic_shapes=dyn, strict=False)


def _static_config(share=False):
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass

    return ExecutorchBackendConfig(
        emit_mutable_buffer_names=True,
        memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=share),
    )


def _duplicate_decode_constants(src: bytes) -> bytes:
    """The program with ``decode``'s constants pointed at byte-identical copies."""
    from executorch.exir._serialize._program import deserialize_pte_binary, serialize_pte_binary
    from executorch.exir.schema import Buffer, Tensor

    pte = deserialize_pte_binary(src)
    prog = pte.program
    remap = {}
    for plan in prog.execution_plan:
        if plan.name != "decode":
            continue
        for v in plan.values:
            t = v.val
            if isinstance(t, Tensor) and t.data_buffer_idx > 0:
                if t.data_buffer_idx not in remap:
                    remap[t.data_buffer_idx] = len(prog.constant_buffer)
                    prog.constant_buffer.append(
                        Buffer(storage=bytes(prog.constant_buffer[t.data_buffer_idx].storage)))
                t.data_buffer_idx = remap[t.data_buffer_idx]
    return bytes(serialize_pte_binary(pte, extract_delegate_segments=True))


def _missing_op_program() -> bytes:
    """A program whose operator has no kernel in the runtime (``Missing operator``)."""
    from executorch.exir import EdgeCompileConfig, to_edge

    ns = "lazykv_check_test"
    if not hasattr(torch.ops, ns) or not hasattr(getattr(torch.ops, ns), "twice"):
        lib = torch.library.Library(ns, "DEF")
        lib.define("twice(Tensor x) -> Tensor")
        lib.define("twice.out(Tensor x, *, Tensor(a!) out) -> Tensor(a!)")

        def twice_out(x, *, out):
            out.copy_(x * 2)
            return out

        lib.impl("twice", lambda x: x * 2, "CompositeExplicitAutograd")
        lib.impl("twice.out", twice_out, "CompositeExplicitAutograd")
        _missing_op_program.lib = lib  # keep the registration alive

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.ops.lazykv_check_test.twice(self.l(x))

    ep = torch.export.export(M(), (torch.randn(1, 4),))
    cfg = EdgeCompileConfig(_check_ir_validity=False)
    return to_edge(ep, compile_config=cfg).to_executorch().buffer


@pytest.fixture(scope="session")
def toys(tmp_path_factory):
    """name -> path of the multi-method programs (each exported once per session)."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama:: ops)
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge, to_edge_transform_and_lower

    from lazykv.manifest import MANIFEST_KEY, Manifest, SharedConstant
    from lazykv.passes import to_executorch_lazy

    d = tmp_path_factory.mktemp("check_toys")
    torch.manual_seed(0)
    m = Toy()
    moved = ToyWithHistory()
    moved.load_state_dict(m.state_dict(), strict=False)
    out = {}

    def write(name, data):
        out[name] = d / f"{name}.pte"
        out[name].write_bytes(bytes(data))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # prefill + decode over one model, lazy KV: the good multi-method program.
        write("two_lazy", to_executorch_lazy(to_edge({"prefill": _ep(m), "decode": _ep(m)})).buffer)
        # decode is the same model one module down: other FQNs, so its own cache.
        write("unshared_lazy", to_executorch_lazy(
            to_edge({"prefill": _ep(m), "decode": _ep(Wrapped(m))})).buffer)
        # Same FQNs, static, but decode's plan puts the caches elsewhere.
        write("moved_static", to_edge({"prefill": _ep(m), "decode": _ep(moved)})
              .to_executorch(_static_config()).buffer)
        # A third method without KV whose activations reuse arena 1 under the caches...
        three = {"prefill": _ep(m), "decode": _ep(m), "embed": _ep(NoKV(), "nokv")}
        write("clobbered_static", to_edge(three).to_executorch(_static_config()).buffer)
        # ...and the same with share_mutable_buffers (caches alone in arena 2).
        three = {"prefill": _ep(m), "decode": _ep(m), "embed": _ep(NoKV(), "nokv")}
        shared = to_edge(three).to_executorch(_static_config(share=True)).buffer
        write("shared_static", shared)
        write("dup_static", _duplicate_decode_constants(bytes(shared)))
        # XNNPACK delegates of both methods use the same named weights.
        write("two_xnnpack", to_executorch_lazy(to_edge_transform_and_lower(
            {"prefill": _ep(m), "decode": _ep(m)}, partitioner=[XnnpackPartitioner()])).buffer)
        # A real lazykv manifest that records a constant stored once per method.
        em = to_edge({"prefill": _ep(m), "decode": _ep(m)})
        manifest = Manifest(shared_constants=(
            SharedConstant("q.weight", E * E * 4, ("prefill", "decode"), stored_once=False),))
        em._named_data_store.add_named_data(MANIFEST_KEY, manifest.to_bytes())
        write("manifest_per_method", em.to_executorch(_static_config(share=True)).buffer)
        write("missing_op", _missing_op_program())
    return out


def _one(path, **rules):
    res = check_file(path, Rules(**rules))
    assert res.error is None, res.error
    assert len(res.rules) == 1
    return res.rules[0]


def _text(r):
    return "\n".join(r.failures)


# -- methods -------------------------------------------------------------------------------


def test_methods(toys, llama_tiny_static):
    assert _one(toys["two_lazy"], methods="prefill,decode").passed
    # "at least": constant methods and others may be there too.
    assert _one(llama_tiny_static[1].path, methods=["forward"]).passed
    r = _one(toys["two_lazy"], methods="prefill,decode,verify")
    assert not r.passed
    assert r.failures == ["missing method 'verify'; the program has: decode, prefill"]
    assert r.figures["missing"] == ["verify"]


# -- expect-lazy-kv ------------------------------------------------------------------------


def test_expect_lazy_kv_good(llama_tiny_lazy, toys):
    r = _one(llama_tiny_lazy[1].path, expect_lazy_kv=True)
    assert r.passed, r.failures
    assert r.figures["kv_buffers"] == r.figures["lazy"] == 8
    assert r.summary.startswith("8 of 8 KV buffers lazy")
    assert _one(toys["two_lazy"], expect_lazy_kv=True).passed


def test_expect_lazy_kv_bad_names_every_static_cache(llama_tiny_static, toys):
    path = llama_tiny_static[1].path
    kv = inspect_pte(path)["kv_buffers"]
    r = _one(path, expect_lazy_kv=True)
    assert not r.passed and len(r.failures) == len(kv) == 8
    for b, msg in zip(kv, r.failures):
        (method, index), = b["value_index"].items()
        assert f"{method} value {index}" in msg  # no FQN in this export: method + value
        assert f"{b['nbytes']:,} B is not lazy" in msg and "arena 1" in msg
    # With FQNs the failure names them.
    r = _one(toys["moved_static"], expect_lazy_kv=True)
    assert [m.split()[2] for m in r.failures] == ["'kc'", "'vc'"]
    assert f"{KV_BYTES:,} B is not lazy: STATIC, planned in arena 1" in r.failures[0]


def test_expect_lazy_kv_needs_a_cache(toys):
    r = _one(toys["missing_op"], expect_lazy_kv=True)
    assert not r.passed and "no position-indexed KV cache found" in r.failures[0]


# -- max-planned-bytes ---------------------------------------------------------------------


def test_max_planned_bytes(llama_tiny_static, llama_tiny_lazy):
    path = llama_tiny_static[1].path
    planned = inspect_pte(path)["planned_bytes"]
    assert planned == llama_tiny_static[1].planned_bytes
    assert _one(path, max_planned_bytes=planned).passed
    r = _one(path, max_planned_bytes="8MiB")
    assert not r.passed
    assert r.failures[0].startswith(f"forward: planned {planned:,} B > limit 8,388,608 B")
    assert "8 planned KV buffers hold 16,777,216 B" in r.failures[0]
    assert r.figures == {"planned_bytes": planned, "limit": 8 * 2**20, "by_method": {"forward": planned}}
    # The lazy export of the same model fits.
    assert _one(llama_tiny_lazy[1].path, max_planned_bytes="8MiB").passed


# -- max-kv-bytes-at-max-context -----------------------------------------------------------


def test_max_kv_bytes_at_max_context(llama_tiny_static, llama_tiny_lazy):
    for fx in (llama_tiny_static, llama_tiny_lazy):  # lazy or not, the bound is the same
        path = fx[1].path
        assert _one(path, max_kv_bytes_at_max_context="16MiB").passed
        r = _one(path, max_kv_bytes_at_max_context="10MB")
        assert not r.passed
        msg = r.failures[0]
        assert msg.startswith("KV at max context 16,777,216 B > limit 10,000,000 B: 8 buffers")
        assert "at max context 4,096" in msg and "float32[1, 4096, 4, 32] 2,097,152 B" in msg


# -- max-load-bytes ------------------------------------------------------------------------


def test_max_load_bytes(llama_tiny_lazy):
    from lazykv.format.pte import open_pte

    path = llama_tiny_lazy[1].path
    info = inspect_pte(path)
    prog = open_pte(path).program
    delegate_segments = {d.index for p in prog.plans for d in p.delegates}
    expected = (info["planned_bytes"] + info["constants"]["bytes"] + info["constants"]["named_data_bytes"]
                + sum(prog.segments[i].size for i in delegate_segments))
    r = _one(path, max_load_bytes=expected)
    assert r.passed and r.figures["load_bytes"] == expected
    assert r.figures["named_data_bytes"] > 0 and r.figures["delegate_bytes"] > 0
    r = _one(path, max_load_bytes=expected - 1)
    assert not r.passed
    msg = r.failures[0]
    assert msg.startswith(f"load {expected:,} B > limit {expected - 1:,} B = planned {info['planned_bytes']:,}")
    assert "largest: " in msg and "named data '" in msg  # the embedding table is the biggest part


# -- no-duplicate-constants ----------------------------------------------------------------


def test_no_duplicate_constants_good(toys, llama_tiny_lazy):
    for name in ("two_lazy", "shared_static"):
        r = _one(toys[name], no_duplicate_constants=True)
        assert r.passed, r.failures
        assert r.figures["duplicate_bytes"] == 0
    r = _one(llama_tiny_lazy[1].path, no_duplicate_constants=True)
    assert r.passed and r.figures["named_data"] > 0


def test_no_duplicate_constants_stored_twice(toys):
    r = _one(toys["dup_static"], no_duplicate_constants=True)
    assert not r.passed
    assert len(r.failures) == 6  # three Linear layers: weight and bias each
    assert r.failures[0].startswith(f"the same {E * E * 4:,} B is stored 2 times: constant buffer ")
    for msg in r.failures:
        assert "(used by prefill)" in msg and "(used by decode)" in msg
    assert r.figures["duplicate_bytes"] == 3 * (E * E + E) * 4


def test_no_duplicate_constants_manifest(toys):
    r = _one(toys["manifest_per_method"], no_duplicate_constants=True)
    assert not r.passed
    assert r.failures == [
        f"constant 'q.weight' ({E * E * 4:,} B) is stored once per method (prefill, decode; "
        f"lazykv manifest: stored_once = false)"
    ]


def test_no_duplicate_constants_resident_per_method(toys):
    r = _one(toys["two_xnnpack"], no_duplicate_constants=True)
    assert not r.passed
    (msg,) = r.failures
    assert "packed by the XNNPACK delegates of decode, prefill" in msg
    assert "largest: named data '" in msg and "--assume-weight-cache" in msg
    assert len(r.figures["resident_per_method"]) == 6
    # Stored once, and resident once with the weight cache on.
    ok = _one(toys["two_xnnpack"], no_duplicate_constants=True, assume_weight_cache=True)
    assert ok.passed, ok.failures


# -- shared-kv -----------------------------------------------------------------------------


def test_shared_kv_good(toys, llama_tiny_lazy):
    for name in ("two_lazy", "shared_static"):
        r = _one(toys[name], shared_kv=True)
        assert r.passed, r.failures
        assert r.summary == "decode, prefill bind the same 2 KV buffers"
    r = _one(llama_tiny_lazy[1].path, shared_kv=True)
    assert r.passed and r.summary == "only forward binds KV (8 buffers): nothing to share"


def test_shared_kv_other_fqns(toys):
    r = _one(toys["unshared_lazy"], shared_kv=True)
    assert not r.passed
    assert sorted(r.failures) == sorted(
        f"{m}: does not bind KV buffer '{b}' float32[1, {N}, {H}, {D}] (bound by {o}): its "
        f"methods keep separate caches"
        for m, o, b in (("prefill", "decode", "inner.kc"), ("prefill", "decode", "inner.vc"),
                        ("decode", "prefill", "kc"), ("decode", "prefill", "vc"))
    )


def test_shared_kv_planned_in_different_places(toys):
    r = _one(toys["moved_static"], shared_kv=True)
    assert not r.passed and len(r.failures) == 2
    assert r.failures[0].startswith("KV buffer 'kc' is planned in different places (decode at arena 1 offset ")
    assert "prefill at arena 1 offset 4,096" in r.failures[0]


def test_shared_kv_overwritten_by_another_method(toys):
    r = _one(toys["clobbered_static"], shared_kv=True)
    assert not r.passed
    assert all(": embed plans value " in m and "share_mutable_buffers=True" in m for m in r.failures)
    assert {m.split()[2] for m in r.failures} == {"'kc'", "'vc'"}


def test_shared_kv_needs_a_cache(toys):
    r = _one(toys["missing_op"], shared_kv=True)
    assert not r.passed and "no position-indexed KV cache found" in r.failures[0]


# -- runs ----------------------------------------------------------------------------------


def test_runs_good(toys, example_lazy, llama_tiny_static):
    r = _one(example_lazy[1].path, runs=True)
    assert r.passed, r.failures
    assert r.figures["methods"]["forward"]["inputs"] == ["int64[1, 1]", "int64[1]"]
    r = _one(toys["two_lazy"], runs=True)
    assert r.passed, r.failures
    assert set(r.figures["methods"]) == {"prefill", "decode"}
    # Fill rule: the length input is cut to one position.
    assert r.figures["methods"]["decode"]["inputs"] == [f"float32[1, 1, {E}]", "int64[1]"]
    r = _one(llama_tiny_static[1].path, runs=True)
    assert r.passed, r.failures
    assert r.figures["methods"]["forward"]["outputs"] == ["float32[1, 1024]"]
    assert r.figures["methods"]["get_max_context_len"]["outputs"] == ["4096"]


def test_runs_bad_names_method_and_missing_operator(toys):
    r = _one(toys["missing_op"], runs=True)
    assert not r.passed
    (msg,) = r.failures
    # The runtime refuses to load the method: lazykv.errors.ProgramRejected (its subclass
    # MissingKernels, naming the operator without a kernel), not a bare RuntimeError from
    # the pybind layer.
    from lazykv.errors import ProgramRejected
    from lazykv.runtime_shim.kernels import MissingKernels

    assert issubclass(MissingKernels, ProgramRejected)
    assert msg.startswith("forward: fails on inputs (float32[1, 4]): MissingKernels: ")
    assert "lazykv_check_test::twice.out" in msg and "'lazykv_check_test' namespace" in msg


def test_dummy_inputs_token_position_pair(llama_tiny_lazy):
    from lazykv.runtime_shim import load

    prog = load(llama_tiny_lazy[1].path)
    info = prog.method_info("forward")
    tokens, pos = dummy_inputs(info, prog.manifest.fill_rule("forward"))
    assert tokens.dtype == torch.int64 and tuple(tokens.shape) == (1, 1) and int(tokens) == 0
    assert pos.dtype == torch.int64 and pos.tolist() == [0]


# -- all rules together --------------------------------------------------------------------


def test_every_rule_on_good_and_bad_files_is_json_ready(toys, llama_tiny_lazy, llama_tiny_static):
    rules = Rules(expect_lazy_kv=True, max_planned_bytes="8MiB", max_load_bytes="64MiB",
                  max_kv_bytes_at_max_context="16MiB", no_duplicate_constants=True,
                  methods=("forward",), shared_kv=True)
    report = check_files([llama_tiny_lazy[1].path, llama_tiny_static[1].path], rules)
    good, bad = report.files
    assert [r.rule for r in good.rules] == list(rules.enabled)
    assert good.status == "pass", report.failure_lines()
    assert bad.status == "fail"
    assert {r.rule for r in bad.rules if not r.passed} == {"expect-lazy-kv", "max-planned-bytes"}
    assert report.return_code == 1
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["exit_code"] == 1 and doc["summary"]["failed_rules"] == 2
    for line in report.failure_lines():
        assert line.startswith(str(llama_tiny_static[1].path))
