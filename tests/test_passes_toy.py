"""lazykv.passes on small hand-written models (real exports, no mocks, no XNNPACK).

Each exported program is built once per session (``scope="session"``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch.export import Dim, export

import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama:: ops)
from executorch.exir import ExecutorchBackendConfig, to_edge
from executorch.exir.passes import MemoryPlanningPass
from executorch.exir.schema import TensorShapeDynamism

from lazykv.errors import ExportRefused, NoMatchingBuffer
from lazykv.manifest import MANIFEST_KEY, FillRule
from lazykv.passes import LazyKVConfig, lazy_kv_backend_config, no_causal_masks, to_executorch_lazy
from lazykv.format.pte import open_pte

N, H, D, E = 64, 2, 8, 16
KV_BYTES = N * H * D * 4  # one [1, N, H, D] fp32 buffer


class Toy(torch.nn.Module):
    """update_cache + custom_sdpa, plus a step counter and a recurrent state.

    ``position``: "input_pos" (tokens [1,S], input_pos [1]) or "cache_position"
    (input_ids [1,S], cache_position [S], HF optimum style; inputs swapped on purpose).
    ``mask``: give custom_sdpa an attention mask (reads the whole cache).
    """

    def __init__(self, position: str = "input_pos", mask: bool = False, state: bool = True):
        super().__init__()
        self.position, self.use_mask, self.use_state = position, mask, state
        self.register_buffer("kc", torch.zeros(1, N, H, D))
        self.register_buffer("vc", torch.zeros(1, N, H, D))
        if state:
            self.register_buffer("step", torch.zeros(1, dtype=torch.long))
            self.register_buffer("h", torch.zeros(1, E))
        self.register_buffer("mask", torch.zeros(N, N), persistent=False)
        self.q = torch.nn.Linear(E, E)
        self.k = torch.nn.Linear(E, E)
        self.v = torch.nn.Linear(E, E)

    def forward(self, a, b):
        if self.position == "cache_position":
            cache_position, x = a, b  # position first: nothing may assume input order
            pos = cache_position[0].item()
        else:
            x, input_pos = a, b
            pos = input_pos[0].item()
        s = x.shape[1]
        q = self.q(x).view(1, s, H, D)
        k = self.k(x).view(1, s, H, D)
        v = self.v(x).view(1, s, H, D)
        torch.ops.llama.update_cache(k, self.kc, pos)
        torch.ops.llama.update_cache(v, self.vc, pos)
        if self.use_mask:
            m = self.mask.narrow(0, pos, s)
            o = torch.ops.llama.custom_sdpa(q, self.kc, self.vc, 0, m, 0, False)
        else:
            o = torch.ops.llama.custom_sdpa(q, self.kc, self.vc, pos, None, 0, True)
        out = o.view(1, s, E)
        if self.use_state:
            self.step.add_(1)
            self.h.copy_(torch.tanh(self.h + out[:, -1]))
        return out


class StateOnly(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("step", torch.zeros(1, dtype=torch.long))
        self.register_buffer("h", torch.zeros(1, E))

    def forward(self, x):
        self.step.add_(1)
        self.h.copy_(torch.tanh(self.h + x[:, -1]))
        return self.h * 2


def _edge(model, position="input_pos"):
    s = Dim("S", min=1, max=32)
    x = torch.randn(1, 4, E)
    if position == "cache_position":
        args = (torch.arange(4), x)
        dyn = ({0: s}, {1: s})
    else:
        args = (x, torch.tensor([0]))
        dyn = ({1: s}, None)
    with torch.no_grad():
        return to_edge(export(model, args, dynamic_shapes=dyn, strict=False))


def _static_sizes(model, position="input_pos"):
    et = _edge(model, position).to_executorch(ExecutorchBackendConfig(emit_mutable_buffer_names=True))
    return list(et.executorch_program.execution_plan[0].non_const_buffer_sizes)


@pytest.fixture(scope="session")
def lazy_toy(tmp_path_factory):
    model = Toy()
    static = _static_sizes(Toy())
    et = to_executorch_lazy(_edge(model))
    path = tmp_path_factory.mktemp("toy") / "toy_lazy.pte"
    path.write_bytes(et.buffer)
    return et, path, static


def test_kv_marked_unplanned_and_named(lazy_toy):
    et, path, static = lazy_toy
    plan = et.executorch_program.execution_plan[0]
    by_name = {}
    for v in plan.values:
        t = v.val
        info = getattr(t, "extra_tensor_info", None)
        if info is not None and info.fully_qualified_name:
            by_name[info.fully_qualified_name] = t
    for fqn in ("kc", "vc"):
        t = by_name[fqn]
        assert t.shape_dynamism == TensorShapeDynamism.DYNAMIC_UNBOUND
        assert t.allocation_info is None
        assert list(t.sizes) == [1, N, H, D]
    # Recurrent state and step counter stay planned and static.
    for fqn in ("step", "h"):
        t = by_name[fqn]
        assert t.shape_dynamism == TensorShapeDynamism.STATIC
        assert t.allocation_info is not None
    assert sum(plan.non_const_buffer_sizes) <= sum(static) - 2 * KV_BYTES


def test_manifest_in_pte(lazy_toy):
    _, path, _ = lazy_toy
    pte = open_pte(path)
    assert MANIFEST_KEY in pte.named_data_keys()
    m = pte.manifest
    assert [b.fqn for b in m.lazy_buffers] == ["kc", "vc"]
    b = m.buffer("kc")
    assert (b.dtype, b.max_shape, b.growth_axis, b.methods) == ("float32", (1, N, H, D), 1, ("forward",))
    assert b.bytes_per_position == H * D * 4
    assert m.fill_rules == (FillRule("forward", 1, 0, 0, 1),)
    assert m.producer.startswith("lazykv ")


def test_fill_rule_hf_style_any_input_order():
    et = to_executorch_lazy(_edge(Toy("cache_position", state=False), "cache_position"))
    # Manifest is in the program's named data; read it back through the .pte bytes.
    m = open_pte(et.buffer).manifest
    # inputs are (cache_position [S], input_ids [1, S]): position = input 0 element 0,
    # length = input 1 axis 1 (or input 0 axis 0: the same symbol S).
    rule = m.fill_rule("forward")
    assert (rule.position_input, rule.position_index) == (0, 0)
    assert (rule.length_input, rule.length_axis) in ((1, 1), (0, 0))
    inputs = [torch.arange(5, 9), torch.zeros(1, 4, E)]
    assert rule.positions_needed(inputs) == 9


def test_refuses_custom_sdpa_with_mask():
    with pytest.raises(ExportRefused) as ei:
        to_executorch_lazy(_edge(Toy(mask=True, state=False)))
    msg = str(ei.value)
    assert "'kc'" in msg and "custom_sdpa" in msg and "mask" in msg and "node '" in msg
    assert "use_sdpa_with_kv_cache=True" in msg


def test_state_only_program_is_refused_not_silently_static():
    with pytest.raises(ExportRefused, match="no position-indexed KV cache"):
        with torch.no_grad():
            edge = to_edge(export(StateOnly(), (torch.randn(1, 3, E),), strict=False))
        to_executorch_lazy(edge)


def test_selecting_state_buffer_is_refused():
    edge = _edge(Toy())
    with pytest.raises(ExportRefused, match="'step'.*not a position-indexed"):
        to_executorch_lazy(edge, buffers=["step"])


def test_pattern_matching_nothing_is_an_error():
    edge = _edge(Toy())
    with pytest.raises(NoMatchingBuffer) as ei:
        to_executorch_lazy(edge, buffers=["re:layers\\..*k_cache"])
    assert "kc" in str(ei.value) and "step" in str(ei.value)
    # No substring matching: "k" is not "kc".
    with pytest.raises(NoMatchingBuffer):
        to_executorch_lazy(edge, LazyKVConfig(buffers=("k",)))


def test_selection_by_regex_marks_only_selected():
    et = to_executorch_lazy(_edge(Toy()), buffers="re:k.")
    m = open_pte(et.buffer).manifest
    assert [b.fqn for b in m.lazy_buffers] == ["kc"]


def test_user_config_kept_and_incompatible_refused():
    edge = _edge(Toy())
    cfg = lazy_kv_backend_config(
        edge, ExecutorchBackendConfig(memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False))
    )
    assert cfg.emit_mutable_buffer_names is True
    assert cfg.memory_planning_pass["forward"].inner.alloc_graph_input is False
    with pytest.raises(ExportRefused, match="alloc_mutable_buffers=False"):
        lazy_kv_backend_config(
            edge,
            ExecutorchBackendConfig(memory_planning_pass=MemoryPlanningPass(alloc_mutable_buffers=False)),
        )


def test_no_causal_masks_sends_nxn_to_meta():
    n = 4096
    with no_causal_masks(n) as mode:
        mask = torch.tril(torch.ones(n, n, dtype=torch.bool, device="cpu"))
        kv = torch.zeros(1, n, 4, 32)
        small = torch.ones(3, 3)
    assert mask.device.type == "meta" and kv.device.type == "cpu" and small.device.type == "cpu"
    assert mode.masks_on_meta == 1 and mode.zeros_made_empty == 1


_RUNTIME = textwrap.dedent(
    """
    import sys
    import executorch.extension.pybindings.portable_lib  # noqa: F401
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    from executorch.runtime import Runtime
    prog = Runtime.get().load_program(sys.argv[1])
    try:
        prog.load_method("forward")
    except RuntimeError as e:
        print("REFUSED", e)
    else:
        print("LOADED")
    """
)


@pytest.mark.slow
def test_stock_runtime_refuses_lazy_pte(lazy_toy):
    _, path, _ = lazy_toy
    # In a subprocess: a runtime mistake must not take the test process down.
    r = subprocess.run(
        [sys.executable, "-c", _RUNTIME, str(path)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "REFUSED" in r.stdout
    assert "Fully dynamic tensor shapes not yet supported" in (r.stdout + r.stderr)


def test_two_methods_share_mutable_buffers():
    """prefill + decode with the user's share_mutable_buffers=True: KV lazy in both,
    the other state still shared on memory id 2, one fill rule per method."""
    model = Toy()
    with torch.no_grad():
        prefill = export(model, (torch.randn(1, 4, E), torch.tensor([0])),
                         dynamic_shapes=({1: Dim("S", min=2, max=32)}, None), strict=False)
        decode = export(model, (torch.randn(1, 1, E), torch.tensor([0])), strict=False)
    edge = to_edge({"prefill": prefill, "decode": decode})
    et = to_executorch_lazy(
        edge,
        ExecutorchBackendConfig(memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True)),
    )
    m = open_pte(et.buffer).manifest
    assert {b.fqn: set(b.methods) for b in m.lazy_buffers} == {
        "kc": {"prefill", "decode"}, "vc": {"prefill", "decode"}
    }
    rules = {r.method: r for r in m.fill_rules}
    assert set(rules) == {"prefill", "decode"}
    assert (rules["prefill"].position_input, rules["prefill"].length_input, rules["prefill"].length_axis) == (1, 0, 1)
    # decode is static [1, 1]: any input dim of size 1 gives the same (constant) length.
    assert rules["decode"].positions_needed([torch.zeros(1, 1, E), torch.tensor([7])]) == 8
    for plan in et.executorch_program.execution_plan:
        by_name = {
            v.val.extra_tensor_info.fully_qualified_name: v.val
            for v in plan.values
            if getattr(v.val, "extra_tensor_info", None) is not None
        }
        assert by_name["kc"].allocation_info is None
        assert by_name["step"].allocation_info.memory_id == 2
        assert by_name["h"].allocation_info.memory_id == 2
