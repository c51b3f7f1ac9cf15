// The KV bytes a program holds, counted as `lazykv inspect` counts them.
#pragma once

#include <lazykv/lazykv.h>

#include "pte_format.h"
#include "rebind.h"

namespace lazykv {

/// `KvFigures` of a parsed (not rebound) program: its KV caches are the mutable buffers
/// that are lazy (the manifest's, or DYNAMIC_UNBOUND) or written by a position-indexed
/// cache update kernel (`llama::update_cache`, `update_cache_with_indices`,
/// `update_quantized_cache`: argument 1), each counted once over the methods, at its
/// upper bound. The rules of `lazykv/inspect.py` (`_mutable_buffers`, `_cache_targets`,
/// `inspect_pte`): `at_max_context` is its `kv_bytes_at_max_context`, `planned_bytes`
/// that minus its `lazy_kv_bytes`.
KvFigures kv_figures(const fb::ProgramModel& model, const Manifest& manifest);

}  // namespace lazykv
