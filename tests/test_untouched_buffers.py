"""untouched_buffers(): Dynamo's clone of a never-written KV buffer costs no memory."""

from __future__ import annotations

import torch

from lazykv.passes import untouched_buffers


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_dynamo_clone_of_a_tracked_buffer_stays_untouched():
    from torch._dynamo.utils import clone_input  # what strict torch.export calls per buffer

    mode = untouched_buffers()
    kv = torch.empty(1, 4096, 16, 1024)  # 256 MiB, never written: no resident pages
    mode.track(kv)
    before = _rss_mib()
    with mode:
        copies = [clone_input(kv) for _ in range(2)]
    grew = _rss_mib() - before
    assert grew < 32, f"RSS grew {grew:.0f} MiB"
    assert all(c.shape == kv.shape and c.dtype == kv.dtype for c in copies)
    assert mode.clones_elided >= 2 and mode.copies_elided >= 2


def test_other_tensors_are_copied_as_usual():
    mode = untouched_buffers()
    kv = torch.empty(2, 3)
    mode.track(kv)
    real = torch.arange(6.0).view(2, 3)
    dst = torch.zeros(2, 3)
    with mode:
        c = real.clone()
        dst.copy_(real)
        assert mode.tracked(kv[0]) and not mode.tracked(real) and not mode.tracked(c)
    assert torch.equal(c, real) and torch.equal(dst, real)
    assert mode.clones_elided == 0 and mode.copies_elided == 0
