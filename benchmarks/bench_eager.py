"""Our eager PaliGemma against transformers' `PaliGemmaForConditionalGeneration`, same weights.

Both models hold the *same* random fp32 tensors (ours gets seeded random weights as `pgexport
init` writes them; transformers' model is built without initialising its parameters and given
ours' tensors, so the weights exist once in memory) at the geometry of a preset (default
`paligemma-3b-pt-224`) with a reduced number of decoder (and optionally vision) layers, because
two fp32 3B models would not fit in the machine's memory otherwise. Widths, vocabulary and image
size are the preset's.

Stages, each timed side by side (interleaved, warm-up excluded), under torch.inference_mode:

1. vision: ours `model.encode_image(px)` vs transformers `get_image_features(px).pooler_output`
   (SigLIP + projector), batch 1.
2. prefill (time to the first token's logits, vision included): ours `EagerStepper.prefill`
   (static KV cache sized prompt + new tokens) vs transformers' forward on the whole prompt with
   `pixel_values`, `token_type_ids` = 0 (bidirectional prefix, as at inference), a fresh
   `DynamicCache` and `logits_to_keep=1`. Both then take the argmax.
3. decode: `--new-tokens` greedy steps after that prefill. Ours `EagerStepper.decode`; transformers
   a forward of one token with its cache, the growing all-ones attention mask and
   `logits_to_keep=1` (what `generate` does per step, without its logits processors and
   stopping criteria, so this favours transformers slightly). Each step is timed on its own.

Prefill and decode come from the same generation runs: per repeat both prefill (order alternating
per repeat), then their decode steps are interleaved one by one (ours step i next to transformers
step i, order flipping every step). Besides the ratio of medians, a *paired* ratio (each timing of
ours over the transformers timing taken next to it) is reported: on a shared machine whose load
drifts it is the more robust of the two. Process CPU time is recorded next to wall time.

Afterwards a breakdown of one prefill and of 8 decode steps is taken for both models (forward
hooks on modules plus timing wrappers around the functions that are not modules: masks, RoPE
tables, attention kernel, KV-cache update, LM head; inclusive times, median of
`--breakdown-repeats` interleaved runs), and for every stage where ours is slower, a
torch.profiler table of the top ops.

    python benchmarks/bench_eager.py --text-layers 6 --vision-layers 27 --repeats 5 --new-tokens 64
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import set_omp_wait_policy  # noqa: E402

if __name__ == "__main__":  # before torch loads its OpenMP runtime
    set_omp_wait_policy(sys.argv[1:])

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    HFRunner, OursRunner, Stats, command_line, current_rss_bytes, fmt_ms, fmt_stats_ms, generation_runs, gib,
    machine_info, machine_markdown, markdown_table, peak_rss_bytes, profile_table, progress, random_inputs, ratio,
    reduced_config, save_results, transformers_sharing,
)

OURS, HF = "ours", "transformers"
STAGES = ("vision", "prefill", "decode")
METHODS = {
    "vision": "ours encode_image vs transformers get_image_features().pooler_output",
    "prefill": "ours EagerStepper.prefill (static cache) vs transformers forward(pixel_values, token_type_ids=0, "
               "DynamicCache, logits_to_keep=1); both include vision and argmax",
    "decode": "ours EagerStepper.decode vs transformers forward(1 token, DynamicCache, growing ones mask, "
              "logits_to_keep=1); greedy, each step timed",
}


# --------------------------------------------------------------------------- models
def build_models(preset: str, text_layers: int, vision_layers: int, attn: str, seed: int):
    """(cfg, ours, hf): ours with seeded random weights at the reduced geometry, transformers'
    model holding ours' tensors."""
    from pgexport.models import PaliGemma, PaliGemmaConfig

    cfg = reduced_config(PaliGemmaConfig.from_preset(preset), text_layers, vision_layers)
    ours = PaliGemma.random(cfg, seed=seed)
    return cfg, ours, transformers_sharing(ours, attn)


def preset_layers(preset: str) -> tuple[int, int]:
    from pgexport.models import PaliGemmaConfig

    c = PaliGemmaConfig.from_preset(preset)
    return c.text.num_hidden_layers, c.vision.num_hidden_layers


# --------------------------------------------------------------------------- breakdown
MODULE_GROUPS = [  # (group, regex on the pgexport-style module name); inclusive times
    ("vision_tower", r"^vision_tower$"),
    ("projector", r"^multi_modal_projector$"),
    ("embed_tokens", r"^language_model\.embed_tokens$"),
    ("rope_tables", r"^language_model\.rotary_emb$"),  # transformers' module; ours: a function
    ("self_attn", r"^language_model\.layers\.\d+\.self_attn$"),
    ("  qkvo_proj", r"^language_model\.layers\.\d+\.self_attn\.[qkvo]_proj$"),
    ("mlp", r"^language_model\.layers\.\d+\.mlp$"),
    ("norms", r"^language_model\.(layers\.\d+\.\w*layernorm|norm)$"),
    ("lm_head", r"^lm_head$"),  # transformers' module; ours: GemmaDecoder.logits
]
DECODER_LAYER = r"^language_model\.layers\.\d+$"
# Disjoint groups whose sum is subtracted from the total to give "other".
TOP_LEVEL = ["vision_tower", "projector", "embed_tokens", "masks", "rope_tables", "self_attn", "mlp", "norms", "lm_head"]
NESTED_IN_ATTN = ["  qkvo_proj", "  apply_rotary", "  attention_kernel", "  kv_cache_update"]


def function_targets(impl: str) -> list[tuple[Any, str, str, bool]]:
    """(owner, attribute, group, only inside decoder layers) for functions without a module."""
    if impl == OURS:
        from pgexport.models import gemma, paligemma
        from pgexport.models.kv_cache import StaticKVCache

        return [
            (paligemma, "prefix_lm_mask", "masks", False),
            (gemma, "rotary_cos_sin", "rope_tables", False),
            (gemma, "apply_rotary", "  apply_rotary", True),
            (gemma, "attention", "  attention_kernel", True),
            (StaticKVCache, "update", "  kv_cache_update", True),
            (gemma.GemmaDecoder, "logits", "lm_head", False),
        ]
    from transformers.cache_utils import DynamicLayer
    from transformers.models.paligemma import modeling_paligemma

    return [
        (modeling_paligemma, "create_causal_mask", "masks", False),
        ("sdpa", "sdpa", "  attention_kernel", True),  # ALL_ATTENTION_FUNCTIONS entry
        (DynamicLayer, "update", "  kv_cache_update", True),
    ]


def hook_modules(model, acc: dict[str, float], depth: list[int]) -> list:
    """Forward hooks adding each MODULE_GROUPS module's inclusive time to `acc[group]`, and
    keeping `depth[0]` > 0 while a decoder layer runs. Returns the hook handles."""
    from pgexport.models.checkpoint import to_internal_name

    handles, starts = [], {}
    for name, mod in model.named_modules():
        internal = to_internal_name(name) if name else name
        if re.match(DECODER_LAYER, internal):
            handles += [mod.register_forward_pre_hook(lambda m, a: depth.__setitem__(0, depth[0] + 1)),
                        mod.register_forward_hook(lambda m, a, o: depth.__setitem__(0, depth[0] - 1))]
        for group, pat in MODULE_GROUPS:
            if re.match(pat, internal):
                def pre(m, args, k=id(mod)):
                    starts[k] = time.perf_counter()

                def post(m, args, out, g=group, k=id(mod)):
                    acc[g] += time.perf_counter() - starts.pop(k)

                handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
                break
    return handles


def module_breakdown(model, impl: str, fn: Callable[[], Any]) -> dict[str, float]:
    """Seconds spent in each group during `fn()`: forward hooks on modules, wrappers on functions.

    The wrappers replace module attributes in this process only (nothing is edited on disk) and
    are removed afterwards. Times are inclusive; `other` = total - the disjoint top-level groups.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    acc: dict[str, float] = defaultdict(float)
    depth = [0]  # > 0 while inside a decoder layer

    def timed(group: str, f: Callable, decoder_only: bool) -> Callable:
        def wrapper(*a, **kw):
            if decoder_only and depth[0] == 0:
                return f(*a, **kw)
            t = time.perf_counter()
            try:
                return f(*a, **kw)
            finally:
                acc[group] += time.perf_counter() - t
        return wrapper

    handles = hook_modules(model, acc, depth)
    restore = []
    for owner, attr, group, decoder_only in function_targets(impl):
        if owner == "sdpa":
            ALL_ATTENTION_FUNCTIONS["sdpa"] = timed(group, ALL_ATTENTION_FUNCTIONS["sdpa"], decoder_only)
            restore.append(lambda: ALL_ATTENTION_FUNCTIONS.__delitem__("sdpa"))
        else:
            orig = owner.__dict__[attr]
            setattr(owner, attr, timed(group, orig, decoder_only))
            restore.append(lambda owner=owner, attr=attr, orig=orig: setattr(owner, attr, orig))
    try:
        t0 = time.perf_counter()
        fn()
        total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
        for r in restore:
            r()
    groups = [g for g, _ in MODULE_GROUPS[:5]] + ["masks"] + [g for g, _ in MODULE_GROUPS[5:]] + NESTED_IN_ATTN[1:]
    out = {g: acc.get(g, 0.0) for g in groups}
    out["  rest of self_attn (views, transposes, GQA glue)"] = out["self_attn"] - sum(out[g] for g in NESTED_IN_ATTN)
    out["other (embed merge, positions, glue, numpy)"] = total - sum(out[g] for g in TOP_LEVEL)
    out["total"] = total
    order = TOP_LEVEL[:5] + ["self_attn"] + NESTED_IN_ATTN + ["  rest of self_attn (views, transposes, GQA glue)"] + \
        ["mlp", "norms", "lm_head", "other (embed merge, positions, glue, numpy)", "total"]
    return {k: out[k] for k in order}


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of y over x."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return slope, my - slope * mx


def median_breakdown(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def decode_steps_fn(runner, n: int, new_tokens: int):
    """Prefill (untimed by the caller's hook window) is done outside; returns the step closure."""
    runner.prefill(new_tokens)
    tok = int(runner.logits[0].argmax())

    def steps():
        t = tok
        for _ in range(n):
            t = runner.decode(t)

    return steps


# --------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paligemma-3b-pt-224")
    ap.add_argument("--text-layers", type=int, default=6, help="decoder layers (preset: 18); widths stay full")
    ap.add_argument("--vision-layers", type=int, default=27, help="SigLIP layers (preset: 27)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per stage and implementation")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per stage and implementation")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode steps timed after the prefill")
    ap.add_argument("--prompt-tokens", type=int, default=10, help="text tokens after the image tokens (bos + text + newline)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention implementation")
    ap.add_argument("--profile", default="auto", choices=["auto", "always", "never"],
                    help="torch.profiler tables: for stages where ours is slower (auto), all, or none")
    ap.add_argument("--omp-wait-policy", default=None, choices=["passive", "active", "default"],
                    help="OMP_WAIT_POLICY for this run (applied before torch loads; default: the environment's, "
                         "else passive, because spinning OpenMP workers distort timings on a shared machine)")
    ap.add_argument("--breakdown-repeats", type=int, default=3, help="runs of the per-module breakdown (median taken)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/eager_vs_transformers", help="output path without suffix (.json and .md)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    info = machine_info()
    progress(f"machine: {info['cpu_model']}, {info['usable_cores']} cores, torch threads {info['torch_threads']}, "
             f"{info['mem_available_gib']} GiB available")

    progress(f"building models: {args.preset}, text layers {args.text_layers}, vision layers {args.vision_layers}, fp32")
    t = time.perf_counter()
    cfg, ours, hf = build_models(args.preset, args.text_layers, args.vision_layers, args.hf_attn, args.seed)
    n_params = sum(p.numel() for p in ours.parameters())
    progress(f"built in {time.perf_counter() - t:.1f}s: {n_params / 1e9:.3f}B parameters shared, RSS {gib(current_rss_bytes()):.2f} GiB")
    ids, mask, px = random_inputs(cfg, args.prompt_tokens, args.seed + 1)
    runners = {OURS: OursRunner(ours, ids, mask, px), HF: HFRunner(hf, ids, mask, px)}
    models = {OURS: ours, HF: hf}
    results: dict[str, Any] = {"benchmark": "eager_vs_transformers",
                               "setup": setup(args, cfg, hf, n_params, int(ids.shape[1])), "machine": info}

    with torch.inference_mode():
        agreement = check_agreement(runners, args.new_tokens)
        progress(f"stages vision, prefill + {args.new_tokens} decode steps: warm-up {args.warmup}, {args.repeats} "
                 "interleaved repeats (prefills alternate, decode steps interleaved one by one)")
        vis, gen = generation_runs(runners, args.repeats, args.warmup, args.new_tokens, warmup_tokens=8)
        agreement["greedy_tokens_equal"] = all(g[OURS]["tokens"] == g[HF]["tokens"] for g in gen)
        agreement["greedy_tokens_ours"] = gen[0][OURS]["tokens"]
        agreement["greedy_tokens_transformers"] = gen[0][HF]["tokens"]
        stages = summarize_stages(vis, gen, args.new_tokens)
        results["agreement"] = agreement
        results["stages"] = stages
        results.update(breakdowns(runners, models, args.new_tokens, args.breakdown_repeats))
        profiles = profile_stages(stages, runners, args.new_tokens, args.profile)
        results["profiles"] = profiles  # top ops as rows, and torch's text table

    results["peak_rss_gib_process"] = gib(peak_rss_bytes())
    save_results(args.out, results, render_markdown(results, profiles), echo=True)
    return 0


def setup(args, cfg, hf, n_params: int, prompt_len: int) -> dict[str, Any]:
    text_in_preset, vision_in_preset = preset_layers(args.preset)
    return {
        "preset": args.preset, "dtype": "float32", "batch": 1,
        "text_layers": args.text_layers, "text_layers_in_preset": text_in_preset,
        "vision_layers": args.vision_layers, "vision_layers_in_preset": vision_in_preset,
        "image_size": cfg.vision.image_size, "image_tokens": cfg.num_image_tokens,
        "prompt_len": prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats, "warmup": args.warmup,
        "threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (unset)"),
        "transformers_attn_implementation": hf.config._attn_implementation,
        "parameters": n_params, "weights_shared": True, "breakdown_repeats": args.breakdown_repeats,
        "methods": METHODS,
    }


def check_agreement(runners: dict, new_tokens: int) -> dict[str, Any]:
    """Both models on the same input: vision features and first-token logits, max |difference|."""
    progress("checking that both models compute the same thing")
    f_ours, f_hf = runners[OURS].vision(), runners[HF].vision()
    l_ours = (runners[OURS].prefill(new_tokens), runners[OURS].logits.copy())
    l_hf = (runners[HF].prefill(new_tokens), runners[HF].logits.float().numpy().copy())
    agreement = {
        "vision_max_abs_diff": float((f_ours - f_hf).abs().max()),
        "vision_max_abs": float(f_hf.abs().max()),
        "prefill_logits_max_abs_diff": float(np.abs(l_ours[1] - l_hf[1]).max()),
        "prefill_logits_max_abs": float(np.abs(l_hf[1]).max()),
        "prefill_argmax_equal": l_ours[0] == l_hf[0],
    }
    progress(f"agreement: {agreement}")
    return agreement


def summarize_stages(vis, gen: list[dict], new_tokens: int) -> dict[str, dict[str, Any]]:
    """Per stage and implementation: wall and CPU statistics, peak memory, decode flatness; then
    the ratios of medians and the paired ratios (each sample of ours over the transformers sample
    taken right next to it)."""
    k = min(8, new_tokens)
    stages: dict[str, dict[str, Any]] = {"vision": {}, "prefill": {}, "decode": {}}
    for n in (OURS, HF):
        stages["vision"][n] = {
            "stats": vis[n].stats, "cpu_stats": vis[n].cpu_stats, "peak_extra_gib": gib(vis[n].peak_extra_bytes),
            "cpu_per_wall": statistics.median(r.cpu_seconds / r.seconds for r in vis[n].runs)}
        stages["prefill"][n] = {
            "stats": Stats.of(g[n]["prefill_s"] for g in gen), "cpu_stats": Stats.of(g[n]["prefill_cpu_s"] for g in gen),
            "peak_extra_gib": gib(max(g[n]["prefill_peak_extra"] for g in gen)),
            "cpu_per_wall": statistics.median(g[n]["prefill_cpu_s"] / g[n]["prefill_s"] for g in gen)}
        stages["decode"][n] = decode_summary([g[n] for g in gen], k, new_tokens)
    pairs = {
        "vision": [o.seconds / h.seconds for o, h in zip(vis[OURS].runs, vis[HF].runs)],
        "prefill": [g[OURS]["prefill_s"] / g[HF]["prefill_s"] for g in gen],
        "decode": [o / h for g in gen for o, h in zip(g[OURS]["step_s"], g[HF]["step_s"])],
    }
    # does ours grow relative to transformers over the run? paired ratios of the first vs last k steps
    stages["decode"]["paired_ratio_first_k"] = Stats.of(o / h for g in gen for o, h in zip(g[OURS]["step_s"][:k], g[HF]["step_s"][:k]))
    stages["decode"]["paired_ratio_last_k"] = Stats.of(o / h for g in gen for o, h in zip(g[OURS]["step_s"][-k:], g[HF]["step_s"][-k:]))
    for stage, st in stages.items():
        st["ratio_ours_over_transformers"] = ratio(st[OURS]["stats"].median, st[HF]["stats"].median)
        st["paired_ratio"] = Stats.of(pairs[stage])
        st["cpu_ratio_ours_over_transformers"] = ratio(st[OURS]["cpu_stats"].median, st[HF]["cpu_stats"].median)
    return stages


def decode_summary(runs: list[dict], k: int, new_tokens: int) -> dict[str, Any]:
    """One implementation's decode steps over the repeats: per-token statistics, the first and
    last `k` steps (wall and CPU), and a least-squares line through the CPU time per step."""
    steps = [r["step_s"] for r in runs]
    cpus = [r["step_cpu_s"] for r in runs]
    first = [statistics.median(s[:k]) for s in steps]
    last = [statistics.median(s[-k:]) for s in steps]
    first_cpu = [statistics.median(c[:k]) for c in cpus]
    last_cpu = [statistics.median(c[-k:]) for c in cpus]
    slope, intercept = fit_line([(i, x) for c in cpus for i, x in enumerate(c)])
    return {
        "stats": Stats.of(statistics.median(s) for s in steps),  # per token: median over steps, per repeat
        "cpu_stats": Stats.of(statistics.median(c) for c in cpus),
        "all_steps": Stats.of(x for s in steps for x in s),
        "first_k": Stats.of(first), "last_k": Stats.of(last), "k": k,
        "last_over_first": ratio(statistics.median(last), statistics.median(first)),
        "first_k_cpu": Stats.of(first_cpu), "last_k_cpu": Stats.of(last_cpu),
        "last_over_first_cpu": ratio(statistics.median(last_cpu), statistics.median(first_cpu)),
        # least-squares line through (step index, CPU seconds) of every step of every repeat
        "cpu_slope_s_per_step": slope, "cpu_intercept_s": intercept,
        "cpu_growth_over_run": ratio(slope * (new_tokens - 1), intercept),
        "per_step_median_s": [statistics.median(col) for col in zip(*steps)],
        "per_step_median_cpu_s": [statistics.median(col) for col in zip(*cpus)],
        "tokens_per_s": 1.0 / statistics.median(statistics.median(s) for s in steps),
        "cpu_per_wall": statistics.median(sum(c) / sum(s) for s, c in zip(steps, cpus)),
        "runs": [{"prefill_s": r["prefill_s"], "prefill_cpu_s": r["prefill_cpu_s"],
                  "step_s": r["step_s"], "step_cpu_s": r["step_cpu_s"]} for r in runs],
    }


def breakdowns(runners: dict, models: dict, new_tokens: int, repeats: int) -> dict[str, Any]:
    """`module_breakdown` of one prefill and of 8 decode steps per implementation, `repeats`
    interleaved runs: their medians and every run."""
    progress(f"breakdown (hooks + function wrappers): one prefill and 8 decode steps per implementation, {repeats} interleaved repeats")
    raw: dict[str, dict[str, list]] = {"prefill": {n: [] for n in runners}, "decode_8_steps": {n: [] for n in runners}}
    for i in range(repeats):
        for n in (list(runners) if i % 2 == 0 else list(runners)[::-1]):
            r = runners[n]
            raw["prefill"][n].append(module_breakdown(models[n], n, lambda r=r: r.prefill(new_tokens)))
            steps_fn = decode_steps_fn(r, min(8, new_tokens), new_tokens)
            raw["decode_8_steps"][n].append(module_breakdown(models[n], n, steps_fn))
            progress(f"breakdown {i + 1}/{repeats} {n}: prefill {raw['prefill'][n][-1]['total'] * 1e3:.0f} ms, "
                     f"8 decode steps {raw['decode_8_steps'][n][-1]['total'] * 1e3:.0f} ms")
    return {"breakdown_seconds": {s: {n: median_breakdown(v) for n, v in d.items()} for s, d in raw.items()},
            "breakdown_seconds_runs": raw}


def profile_stages(stages: dict, runners: dict, new_tokens: int, when: str) -> dict[str, Any]:
    """torch.profiler tables per stage: where ours is slower (`when` = auto), always or never."""
    profiles: dict[str, Any] = {}
    for stage, st in stages.items():
        slower = st["ratio_ours_over_transformers"] > 1.0 or st["paired_ratio"].median > 1.0
        if when == "never" or (when == "auto" and not slower):
            continue
        progress(f"profiling stage {stage} (ratio {st['ratio_ours_over_transformers']:.3f})")
        profiles[stage] = {}
        for n, r in runners.items():
            if stage == "vision":
                fn = r.vision
            elif stage == "prefill":
                fn = lambda r=r: r.prefill(new_tokens)  # noqa: E731
            else:
                fn = decode_steps_fn(r, min(8, new_tokens), new_tokens)
            table, rows = profile_table(fn, row_limit=15)
            profiles[stage][n] = {"top_ops": rows, "table": table}
    return profiles


# --------------------------------------------------------------------------- report
def render_markdown(results: dict[str, Any], profiles: dict[str, Any]) -> str:
    return "\n".join(header_lines(results) + results_lines(results) + flatness_lines(results)
                     + breakdown_lines(results, profiles)) + "\n"


def header_lines(results: dict[str, Any]) -> list[str]:
    s = results["setup"]
    return [
        "# Eager PyTorch: pgexport vs transformers",
        "",
        f"`{command_line('bench_eager.py').strip()}`",
        "",
        f"- model: `{s['preset']}` geometry, fp32, batch 1, **{s['text_layers']} of {s['text_layers_in_preset']} decoder layers**, "
        f"{s['vision_layers']} of {s['vision_layers_in_preset']} vision layers (full widths and vocabulary), "
        f"{s['parameters'] / 1e9:.2f}B parameters, random weights shared by both models",
        f"- input: {s['image_size']}px image ({s['image_tokens']} image tokens) + {s['prompt_len'] - s['image_tokens']} text tokens "
        f"= {s['prompt_len']}; {s['new_tokens']} greedy decode steps",
        f"- {s['repeats']} repeats, ours and transformers interleaved (order alternating; decode steps interleaved one by one), "
        f"{s['warmup']} warm-up excluded; {s['threads']} torch threads, OMP_WAIT_POLICY={s['omp_wait_policy']}; transformers attention: "
        f"`{s['transformers_attn_implementation']}`",
        f"- vision: {s['methods']['vision']}",
        f"- prefill: {s['methods']['prefill']}",
        f"- decode: {s['methods']['decode']}",
        "",
        "## Results (ms, median (p10-p90))",
        "",
    ]


def verdict(r: float, pr: Stats) -> str:
    """Whether ours is slower: not, within the paired spread (< 5%), or clearly."""
    if r <= 1.0 and pr.median <= 1.0:
        return "ok"
    if pr.n >= 3 and pr.p10 < 1.0 < pr.p90 and max(r, pr.median) < 1.05:
        return "**slower** (< 5%, within the paired p10-p90)"
    return "**slower**"


def results_lines(results: dict[str, Any]) -> list[str]:
    s, st = results["setup"], results["stages"]
    rows = []
    for stage, label in (("vision", "vision encoder"), ("prefill", "prefill (time to first logits)"), ("decode", "decode, per token")):
        o, h = st[stage][OURS], st[stage][HF]
        r, pr = st[stage]["ratio_ours_over_transformers"], st[stage]["paired_ratio"]
        rows.append([label, fmt_stats_ms(o["stats"]), fmt_stats_ms(h["stats"]), f"{r:.3f}",
                     f"{pr.median:.3f} ({pr.p10:.2f}-{pr.p90:.2f}, n={pr.n})", verdict(r, pr),
                     f"{o['peak_extra_gib'] * 1024:.0f} / {h['peak_extra_gib'] * 1024:.0f}" if "peak_extra_gib" in o else "(in prefill's)",
                     f"{o['cpu_per_wall']:.2f} / {h['cpu_per_wall']:.2f}"])
    lines = [markdown_table(["stage", OURS, HF, "ratio of medians ours/tf", "paired ratio median (p10-p90)",
                             "target <= 1.0", "peak extra RSS MiB ours / tf", "CPU s per wall s ours / tf"], rows)]
    lines += ["", "Paired ratio: each timing of ours divided by the transformers timing taken right next to it "
              "(vision: same repeat; prefill: same repeat; decode: same step index, steps interleaved one by one), "
              "robust to slow drifts in the machine's load. Peak extra RSS: the largest rise of the process's "
              "resident memory above its level before the call (VmHWM reset per call); the weights are shared and "
              "not counted."]
    lines += ["", f"CPU s per wall s: process CPU time over wall time during the timed calls (at most {s['threads']} "
              "threads; prefill and decode share one value, from whole generation runs). Well below the thread count "
              "means the threads waited for cores held by other processes.", "",
              "Same stages in process CPU time (user + system, all threads; insensitive to waiting for a core, but "
              "counts OpenMP spin-waiting when threads > 1), ms, median (p10-p90):", ""]
    lines.append(markdown_table(["stage", OURS, HF, "CPU ratio ours/tf"], [
        [stage, fmt_stats_ms(st[stage][OURS]["cpu_stats"]), fmt_stats_ms(st[stage][HF]["cpu_stats"]),
         f"{st[stage]['cpu_ratio_ours_over_transformers']:.3f}"] for stage in STAGES]))
    return lines


def flatness_lines(results: dict[str, Any]) -> list[str]:
    s, d, ag = results["setup"], results["stages"]["decode"], results["agreement"]
    k = d[OURS]["k"]
    return [
        "",
        f"Decode flatness: per-token ms, median over repeats of the median of the first / last {k} of "
        f"{s['new_tokens']} steps, in wall time and in process CPU time (CPU time does not move when the "
        "neighbours' load does, so it is the measure of whether a step's work grows); the CPU slope is a "
        "least-squares line through every step of every repeat.",
        "",
        markdown_table(
            ["", f"wall first {k}", f"wall last {k}", "wall last/first", f"CPU first {k}", f"CPU last {k}",
             "CPU last/first", "CPU slope us/token", "CPU growth over run", "tokens/s (wall)", "all steps p10-p90 (wall)"],
            [[n, fmt_ms(d[n]["first_k"].median), fmt_ms(d[n]["last_k"].median), f"{d[n]['last_over_first']:.3f}",
              fmt_ms(d[n]["first_k_cpu"].median), fmt_ms(d[n]["last_k_cpu"].median), f"{d[n]['last_over_first_cpu']:.3f}",
              f"{d[n]['cpu_slope_s_per_step'] * 1e6:.1f}", f"{d[n]['cpu_growth_over_run'] * 100:+.1f}%",
              f"{d[n]['tokens_per_s']:.2f}", f"{fmt_ms(d[n]['all_steps'].p10)}-{fmt_ms(d[n]['all_steps'].p90)}"] for n in (OURS, HF)],
        ),
        "",
        f"Paired decode ratio ours/tf over the first {k} steps: {d['paired_ratio_first_k'].median:.3f}, over the last {k}: "
        f"{d['paired_ratio_last_k'].median:.3f}.",
        "",
        "Agreement (same weights, same inputs): "
        f"vision features max |diff| {ag['vision_max_abs_diff']:.2e} (max |x| {ag['vision_max_abs']:.2f}); "
        f"prefill logits max |diff| {ag['prefill_logits_max_abs_diff']:.2e} (max |x| {ag['prefill_logits_max_abs']:.2f}); "
        f"argmax equal: {ag['prefill_argmax_equal']}; greedy tokens equal over all repeats: {ag['greedy_tokens_equal']}.",
        "",
    ]


def breakdown_lines(results: dict[str, Any], profiles: dict[str, Any]) -> list[str]:
    s, bd = results["setup"], results["breakdown_seconds"]
    lines = [f"## Where the time goes (ms, inclusive, median of {s.get('breakdown_repeats', '?')} runs; forward hooks + function wrappers)",
             ""]
    lines.append(markdown_table(
        ["group", "prefill ours", "prefill tf", "8 decode steps ours", "8 decode steps tf"],
        [[key.replace(" ", "&nbsp;", 2) if key.startswith("  ") else key, fmt_ms(bd["prefill"][OURS][key]), fmt_ms(bd["prefill"][HF][key]),
          fmt_ms(bd["decode_8_steps"][OURS][key]), fmt_ms(bd["decode_8_steps"][HF][key])] for key in bd["prefill"][OURS]],
    ))
    lines += ["", "Indented rows are parts of `self_attn`. Ours: `masks` = `prefix_lm_mask`, `rope_tables` = `rotary_cos_sin`, "
              "`lm_head` = `GemmaDecoder.logits`, `attention_kernel` = `models.attention.attention`, `kv_cache_update` = "
              "`StaticKVCache.update`. transformers: `masks` = `create_causal_mask`, `rope_tables` = `rotary_emb`, "
              "`attention_kernel` = `sdpa_attention_forward`, `kv_cache_update` = `DynamicLayer.update`, no separate "
              "`apply_rotary`. The hooks cost a few microseconds per call; the profiles below are the op-level view."]
    for stage, per in profiles.items():
        lines += ["", f"## torch.profiler, stage `{stage}` (top ops by self CPU time)", ""]
        for n in (OURS, HF):
            lines += [f"### {n}", "", "```", per[n]["table"].rstrip(), "```", ""]
    lines += ["", "## Machine", "", machine_markdown(results["machine"]),
              f"- peak RSS of the benchmark process: {results['peak_rss_gib_process']:.2f} GiB"]
    return lines


if __name__ == "__main__":
    sys.exit(main())
