"""Benchmark: how fast vLLM-CPU prefills, against a plain transformers forward pass.

For each prompt length, on the very same token IDs, it measures
  * vLLM cold prefill   TTFT of the prompt with an empty prefix cache
  * vLLM warm prefill   TTFT of the same prompt again (all full blocks but the last cached)
  * transformers        one eager forward pass of the prompt (float32, same threads)
and prints the ratios. Each number is the median of ``--reps`` runs after a warm-up, all in one
run of this script (the machines are shared and noisy: compare ratios, not absolute times).

Run:
    python bench/prefill_bench.py                       # the harness's engine defaults
    python bench/prefill_bench.py --omp-bind auto       # vLLM's own CPU binding, for comparison
    python bench/prefill_bench.py --skip-transformers --block-size 128
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python bench/prefill_bench.py
    python bench/prefill_bench.py --engine-env VLLM_CPU_ATTN_SPLIT_KV=0
    python bench/prefill_bench.py --json bench/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.backend import ChatTokenizer, OfflineBackend  # noqa: E402
from harness.cli import exit_with  # noqa: E402
from harness.engine import EngineOptions, cpu_threads, vllm_version  # noqa: E402
from harness.errors import UserError  # noqa: E402
from harness.model import resolve_model  # noqa: E402
from harness.report import console  # noqa: E402
from harness.scenario import system_prompt  # noqa: E402


def prompt_of(tokenizer: ChatTokenizer, length: int) -> list[int]:
    """Real text (the agent's system prompt, repeated), cut to ``length`` token IDs."""
    text = system_prompt()
    ids: list[int] = []
    part = 0
    while len(ids) < length:
        ids += tokenizer.encode(f"Part {part}.\n{text}\n")
        part += 1
    return ids[:length]


def op_breakdown(run: Callable[[], object]) -> dict[str, float]:
    """Run ``run`` under torch's profiler; milliseconds of CPU time in matrix multiplies (the
    linear layers), in attention, and in everything else."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    groups = {"linear_ms": 0.0, "attention_ms": 0.0, "other_ms": 0.0}
    for op in prof.key_averages():
        name = op.key.lower()
        group = "attention_ms" if "attention" in name else "linear_ms" if name.endswith("mm") else "other_ms"
        groups[group] += op.self_cpu_time_total / 1000.0
    return {k: round(v, 1) for k, v in groups.items()}


def bench_vllm(
    opts: EngineOptions, prompts: dict[int, list[int]], reps: int, profile_ids: list[int] | None = None
) -> dict[int, dict[str, float]]:
    start = time.perf_counter()
    backend = OfflineBackend(opts, "bench")
    startup_s = time.perf_counter() - start
    out: dict[int, dict[str, float]] = {}
    try:
        for length, ids in prompts.items():
            cold, warm = [], []
            for _ in range(reps):
                backend.start_variant()
                cold.append(backend.generate_tokens(ids).ttft_ms)
                warm.append(backend.generate_tokens(ids).ttft_ms)
            out[length] = {"cold_ms": statistics.median(cold), "warm_ms": statistics.median(warm)}
        if profile_ids is not None:  # the engine runs in this process: the profiler sees its ops
            backend.start_variant()
            out[-1] = op_breakdown(lambda: backend.generate_tokens(profile_ids))
    finally:
        backend.close()
    out[0] = {"startup_s": startup_s}
    return out


def bench_transformers(
    model: str, prompts: dict[int, list[int]], reps: int, threads: int, profile_ids: list[int] | None = None
) -> dict[int, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    out: dict[int, float] = {}
    with torch.inference_mode():
        lm(torch.tensor([prompts[min(prompts)][:64]]))  # warm-up
        for length, ids in prompts.items():
            x = torch.tensor([ids])
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                lm(x, use_cache=True, logits_to_keep=1)
                times.append((time.perf_counter() - t) * 1000.0)
            out[length] = statistics.median(times)
        if profile_ids is not None:
            out[-1] = op_breakdown(lambda: lm(torch.tensor([profile_ids]), use_cache=True, logits_to_keep=1))
    return out


def parse_env(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UserError(f"--engine-env wants KEY=VALUE, got {item!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--lengths", default="512,1024,2048", help="prompt lengths in tokens, comma-separated"
    )
    parser.add_argument("--reps", type=int, default=3, help="runs per measurement; the median is kept")
    parser.add_argument("--threads", type=int, default=None, help="threads for both (default: all cores)")
    parser.add_argument(
        "--omp-bind",
        default=None,
        help="VLLM_CPU_OMP_THREADS_BIND for the engine (default: the harness's choice)",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="vLLM's prefill chunk size (default: the harness's choice)",
    )
    parser.add_argument("--dtype", default=None, help="engine dtype (default float32)")
    parser.add_argument(
        "--block-size", type=int, default=None, help="KV cache block size (default: the harness's, 32 on CPU)"
    )
    parser.add_argument(
        "--preload-iomp",
        action="store_true",
        help="run the engine with Intel's OpenMP runtime preloaded (libiomp5)",
    )
    parser.add_argument(
        "--engine-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for the engine process, e.g. VLLM_CPU_ATTN_SPLIT_KV=0 (repeatable)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        metavar="TOKENS",
        help="also profile one cold prefill of this many tokens on both and split the time into "
        "linear layers, attention and the rest (needs the engine in this process, the default)",
    )
    parser.add_argument("--skip-transformers", action="store_true", help="only measure vLLM")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args(argv)
    engine_env = dict(parse_env(item) for item in args.engine_env)
    wall = time.perf_counter()
    model = resolve_model(args.model).name_or_path
    lengths = [int(x) for x in args.lengths.split(",")]
    threads = args.threads or cpu_threads()
    tokenizer = ChatTokenizer(model)
    prompts = {n: prompt_of(tokenizer, n) for n in lengths}
    opts = EngineOptions(
        model=model,
        device="cpu",
        threads=threads,
        dtype=args.dtype,
        block_size=args.block_size,
        omp_bind=args.omp_bind,
        max_num_batched_tokens=args.max_num_batched_tokens,
        preload_iomp=args.preload_iomp,
    )
    profile_ids = prompt_of(tokenizer, args.profile) if args.profile else None
    os.environ.update(engine_env)  # vLLM reads them when the engine starts
    if profile_ids is not None and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "1":
        raise UserError("--profile needs the engine in this process: drop VLLM_ENABLE_V1_MULTIPROCESSING=1")
    with console.status("vLLM: starting and measuring ..."):
        vllm = bench_vllm(opts, prompts, args.reps, profile_ids)
    for key in engine_env:  # transformers runs in this process, without them
        os.environ.pop(key, None)
    hf: dict[int, Any] = {}
    if not args.skip_transformers:
        with console.status("transformers: measuring ..."):
            hf = bench_transformers(model, prompts, args.reps, threads, profile_ids)

    from rich.table import Table

    table = Table(
        title=f"prefill on {threads} threads, vLLM {vllm_version()}, startup {vllm[0]['startup_s']:.0f} s"
    )
    columns = ("tokens", "vLLM cold ms", "vLLM warm ms", "transformers ms", "cold vs HF", "(cold-warm) vs HF")
    for col in (*columns, "warm speedup"):
        table.add_column(col, justify="right")
    rows: list[dict[str, Any]] = []
    for n in lengths:
        cold, warm = vllm[n]["cold_ms"], vllm[n]["warm_ms"]
        ratio = hf[n] / cold if n in hf else None
        # A warm request computes one block: its TTFT is mostly the engine's fixed per-request
        # cost (scheduling, the hop to the engine core, sampling). Cold minus warm is roughly
        # the prefill compute alone, which is what a bare forward pass measures.
        compute_ratio = hf[n] / (cold - warm) if n in hf and cold > warm else None
        rows.append(
            {
                "tokens": n,
                "vllm_cold_ms": cold,
                "vllm_warm_ms": warm,
                "transformers_ms": hf.get(n),
                "cold_speed_vs_transformers": ratio,
                "cold_minus_warm_speed_vs_transformers": compute_ratio,
                "warm_speedup": cold / warm if warm else None,
            }
        )
        table.add_row(
            str(n),
            f"{cold:,.0f}",
            f"{warm:,.0f}",
            f"{hf[n]:,.0f}" if n in hf else "-",
            f"{ratio:.2f}x" if ratio else "-",
            f"{compute_ratio:.2f}x" if compute_ratio else "-",
            f"{cold / warm:.1f}x" if warm else "-",
        )
    console.print(table)
    profiles = {"vllm": vllm.get(-1), "transformers": hf.get(-1)} if profile_ids is not None else None
    if profiles is not None:
        ops = Table(title=f"where one cold prefill of {args.profile} tokens spends its CPU time (ms)")
        for col in ("engine", "linear layers", "attention", "other"):
            ops.add_column(col, justify="right")
        for engine, groups in profiles.items():
            if groups:
                ops.add_row(engine, *(f"{groups[k]:,.0f}" for k in ("linear_ms", "attention_ms", "other_ms")))
        console.print(ops)
    wall_s = time.perf_counter() - wall
    console.print(f"suite wall time {wall_s:.0f} s; 'cold vs HF' > 1 means vLLM prefills faster")
    if args.json:
        payload = {
            "threads": threads,
            "omp_bind": opts.resolved_omp_bind(),
            "preload_iomp": args.preload_iomp,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "engine_env": engine_env,
            "dtype": args.dtype or "float32",
            "block_size": opts.resolved_block_size(),
            "vllm_version": vllm_version(),
            "startup_s": vllm[0]["startup_s"],
            "rows": rows,
            "profile": {"tokens": args.profile, **profiles} if profiles is not None else None,
            "wall_s": wall_s,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    exit_with(main)
