"""The engine check: a real vLLM engine serves a repeated long prefix from its cache.

Run:
    python -m harness.check [--model M]
"""

from __future__ import annotations

import argparse

from harness.backend import OfflineBackend
from harness.cli import exit_with
from harness.engine import EngineOptions, detect_device
from harness.model import resolve_model
from harness.scenario import system_prompt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check that vLLM reuses a cached prefix.")
    parser.add_argument("--model", help="hub id or folder (default: the embedded default model)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="engine device")
    args = parser.parse_args(argv)
    spec = resolve_model(args.model)
    device = detect_device() if args.device == "auto" else args.device
    backend = OfflineBackend(EngineOptions(model=spec.name_or_path, device=device), spec.display_name)
    try:
        backend.start_variant()
        system = {"role": "system", "content": system_prompt()}
        first = backend.generate([system, {"role": "user", "content": "What tools do you have?"}])
        second = backend.generate([system, {"role": "user", "content": "Which rule is the first?"}])
    finally:
        backend.close()
    ok = first.cached_tokens == 0 and second.cached_tokens > 0
    print(
        f"engine check: {'ok' if ok else 'FAILED'}: second request served {second.cached_tokens:,} of "
        f"{second.prompt_tokens:,} prompt tokens from cache (first: {first.cached_tokens}); "
        f"TTFT {first.ttft_ms:,.0f} ms -> {second.ttft_ms:,.0f} ms; vLLM {backend.info.vllm_version}, "
        f"{backend.info.device}, block size {backend.info.block_size}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    exit_with(main)
