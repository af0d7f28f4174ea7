"""optimum-quanto int8 / int4 linear layers against float32 `nn.Linear` on the CPU, by width.

Why: quanto's CPU path has no fused low-bit kernels for every case, and how much slower a
quantized layer is depends on the layer's size; the README's quanto figures come from here.
One token (decode) and 256 tokens (prefill) through one layer of each width, interleaved.

    python benchmarks/bench_quanto_linear.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    interleaved, machine_info, machine_markdown, markdown_table, progress, ratio, save_results,
)

SHAPES = [(512, 2048), (1024, 8192), (2048, 16384)]  # (in, out): MLP up-projections of growing models


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/quanto_linear")
    args = ap.parse_args(argv)
    import torch
    from optimum.quanto import freeze, qint4, qint8, quantize

    torch.set_num_threads(args.threads)
    rows, data = [], {"machine": machine_info(["optimum-quanto"]), "results": []}
    for k, n in SHAPES:
        layers = {}
        for name, w in (("fp32", None), ("int8", qint8), ("int4", qint4)):
            torch.manual_seed(0)
            layer = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False)).eval()
            if w is not None:
                quantize(layer, weights=w)
                freeze(layer)
            layers[name] = layer
        for tokens in (1, 256):
            x = torch.randn(1, tokens, k)

            def call(layer):
                def run():
                    with torch.no_grad():  # quanto tensors do not support inference_mode
                        layer(x)
                return run

            m = interleaved({name: call(layer) for name, layer in layers.items()}, args.repeats,
                            label=f"{k}x{n} tokens {tokens}", verbose=False)
            med = {name: m[name].stats.median for name in layers}
            data["results"].append({"in": k, "out": n, "tokens": tokens, "median_s": med})
            rows.append([f"{k} x {n}", tokens, f"{med['fp32'] * 1e3:.2f}", f"{med['int8'] * 1e3:.2f}",
                         f"{med['int4'] * 1e3:.2f}", f"{ratio(med['int8'], med['fp32']):.1f}x",
                         f"{ratio(med['int4'], med['fp32']):.1f}x"])
            progress(f"{k}x{n} tokens {tokens}: fp32 {med['fp32'] * 1e3:.2f} ms, int8 {med['int8'] * 1e3:.2f}, "
                     f"int4 {med['int4'] * 1e3:.2f}")
    md = "\n".join([
        "# optimum-quanto linear layers vs float32 on the CPU",
        "",
        f"{args.threads} thread(s), median of {args.repeats} interleaved repeats, batch 1.",
        "",
        markdown_table(["layer (in x out)", "tokens", "fp32 ms", "quanto int8 ms", "quanto int4 ms", "int8 / fp32",
                        "int4 / fp32"], rows),
        "",
        machine_markdown(data["machine"]),
    ])
    save_results(args.out, data, md, echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
