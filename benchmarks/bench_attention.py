"""Prefill attention kernel alone: `pgexport.models.attention.attention` against alternatives.

Follow-up to bench_eager.py. At PaliGemma 1's multi-query geometry (8 query heads, 1 KV head,
head_dim 256) our `attention` folds the 8 query heads into the query length and *expands the
boolean mask* to `[B, 1, 8*S, T]`; SDPA then turns it into a float mask of 8*S*T*4 bytes. The
eager prefill also attends over the whole static KV buffer (T = S + new tokens) although only
S slots are written. This script times one decoder layer's attention call for several prompt
lengths (224 / 448 / 896 px give 256 / 1024 / 4096 image tokens, + 10 text tokens):

* ours: `attention(q, K_buf, V_buf, mask)` as `EagerStepper.prefill` calls it (T = S + new tokens);
* ours, K/V sliced to the S written slots (what slicing the cache for the prefill would give);
* `F.scaled_dot_product_attention(..., enable_gqa=True)` with the *unexpanded* `[B, 1, S, T]` mask
  (bit-identical outputs to ours);
* transformers' `sdpa_attention_forward` as its Gemma layer calls it in prefill (`repeat_kv`, a
  `[1, 1, S, S]` boolean mask).

    python benchmarks/bench_attention.py --seq 266,1034 --repeats 7
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import set_omp_wait_policy  # noqa: E402

if __name__ == "__main__":
    set_omp_wait_policy(sys.argv[1:])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import (  # noqa: E402
    command_line, fmt_stats_ms, interleaved, machine_info, machine_markdown, markdown_table, progress, ratio,
    save_results,
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paligemma-3b-pt-224", help="geometry of the decoder attention")
    ap.add_argument("--seq", default="266,1034", help="prompt lengths S (comma separated); 4106 = 896 px, slow")
    ap.add_argument("--new-tokens", type=int, default=64, help="static buffer tail: T = S + new tokens")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--omp-wait-policy", default=None, choices=["passive", "active", "default"])
    ap.add_argument("--out", default="benchmarks/results/attention_prefill")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pgexport.models import PaliGemmaConfig
    from pgexport.models.attention import attention, prefix_lm_mask

    t = PaliGemmaConfig.from_preset(args.preset).text
    H, Hkv, D = t.num_attention_heads, t.num_key_value_heads, t.head_dim
    scale = t.attn_scale
    hf_module = SimpleNamespace(num_key_value_groups=H // Hkv, is_causal=True, training=False)
    results = {"benchmark": "attention_prefill", "setup": {**vars(args), "heads": H, "kv_heads": Hkv, "head_dim": D},
               "machine": machine_info(), "cases": {}}
    rows = []
    g = torch.Generator().manual_seed(0)
    for S in (int(s) for s in args.seq.split(",")):
        T = S + args.new_tokens
        q = torch.randn(1, H, S, D, generator=g)
        k = torch.randn(1, Hkv, T, D, generator=g)
        v = torch.randn(1, Hkv, T, D, generator=g)
        valid = torch.zeros(1, T, dtype=torch.bool)
        valid[:, :S] = True
        mask = prefix_lm_mask(torch.arange(S), valid, valid.clone(), torch.ones(1, S, dtype=torch.bool))
        ks, vs, ms = k[:, :, :S].contiguous(), v[:, :, :S].contiguous(), mask[..., :S].contiguous()
        cands = {
            "ours (static buffer, T=S+new)": lambda: attention(q, k, v, mask, scale),
            "ours, K/V sliced to S": lambda: attention(q, ks, vs, ms, scale),
            "SDPA enable_gqa, unexpanded mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True),
            "transformers sdpa_attention_forward": lambda: sdpa_attention_forward(hf_module, q, ks, vs, ms, scaling=scale)[0],
        }
        with torch.inference_mode():
            ref = cands["ours (static buffer, T=S+new)"]()
            diffs = {}
            for n, f in cands.items():
                out = f()
                out = out if out.shape == ref.shape else out.transpose(1, 2)  # transformers returns [B, S, H, D]
                diffs[n] = float((out - ref).abs().max())
            progress(f"S={S}: timing {len(cands)} variants, {args.repeats} interleaved repeats")
            runs = interleaved(cands, args.repeats, warmup=1, label=f"S={S}", verbose=False)
        base = runs["transformers sdpa_attention_forward"]
        results["cases"][S] = {}
        for n, m in runs.items():
            results["cases"][S][n] = {"stats": m.stats, "cpu_stats": m.cpu_stats, "peak_extra_mib": m.peak_extra_bytes / 2**20,
                                      "max_abs_diff_vs_ours": diffs[n]}
            rows.append([S, n, fmt_stats_ms(m.stats), fmt_stats_ms(m.cpu_stats), f"{ratio(m.cpu_stats.median, base.cpu_stats.median):.2f}",
                         f"{m.peak_extra_bytes / 2**20:.0f}", f"{diffs[n]:.1e}"])
    md = "\n".join([
        "# Prefill attention, one decoder layer",
        "",
        f"`{command_line('bench_attention.py').strip()}`",
        "",
        f"`{args.preset}` decoder attention: {H} heads, {Hkv} KV heads, head_dim {D}; fp32, batch 1, whole prompt is "
        f"prefix (bidirectional); static buffer T = S + {args.new_tokens}; {args.threads} threads; interleaved repeats.",
        "",
        markdown_table(["S", "variant", "wall ms", "CPU ms", "CPU / transformers", "peak extra MiB", "max abs diff vs ours"], rows),
        "",
        "## Machine", "", machine_markdown(results["machine"]),
    ])
    save_results(args.out, results, md, echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
