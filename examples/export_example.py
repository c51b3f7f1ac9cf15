"""Export lazykv's example decoder to a .pte: the plain script to copy.

    python examples/export_example.py --max-context 4096 -o example.pte            # static
    python examples/export_example.py --max-context 4096 --lazy -o example_lazy.pte

Every step is ExecuTorch's own API; lazykv only replaces ``to_executorch`` with
``to_executorch_lazy`` (and builds the model inside ``no_causal_masks``, which keeps N x N
masks off the heap for models that build them).
"""

import argparse

import torch
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower

from lazykv.errors import LazyKVError
from lazykv.examples.decoder import DecoderConfig, build_example_decoder
from lazykv.passes import no_causal_masks, to_executorch_lazy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--max-seq-len", type=int, default=None,
                    help="longest prompt chunk per call (default: 64, at most --max-context)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lazy", action="store_true", help="lazy KV cache (run with lazykv's shim)")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()

    try:  # one rule for max context vs max prompt chunk (lazykv.context_limits)
        cfg = DecoderConfig(max_context=args.max_context, max_seq_len=args.max_seq_len)
    except LazyKVError as e:
        ap.error(str(e))
    with no_causal_masks(args.max_context):
        model = build_example_decoder(cfg, seed=args.seed)
    with torch.no_grad():
        exported = torch.export.export(
            model, model.example_inputs(), dynamic_shapes=model.dynamic_shapes(), strict=False
        )
    edge = to_edge_transform_and_lower(
        exported,
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
    )
    if args.lazy:
        program = to_executorch_lazy(edge, ExecutorchBackendConfig(emit_mutable_buffer_names=True))
    else:
        program = edge.to_executorch(ExecutorchBackendConfig())
    with open(args.output, "wb") as f:
        program.write_to_file(f)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
