"""Bad input: one line on stderr, a non-zero exit, no traceback, nothing overwritten."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_script

from harness.engine import detect_device


def assert_one_line_error(proc: object, starts: str, code: int = 2) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)  # type: ignore[attr-defined]
    err = proc.stderr.strip()  # type: ignore[attr-defined]
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(starts), err


def test_missing_model_path() -> None:
    proc = run_script("stable_prefix_vs_timestamp.py", "--quick", "--model", "./no/such/model")
    assert_one_line_error(proc, "error: model path ./no/such/model does not exist")


def test_model_folder_without_config(tmp_path: Path) -> None:
    proc = run_script("stable_prefix_vs_timestamp.py", "--quick", "--model", str(tmp_path))
    assert_one_line_error(proc, f"error: model folder {tmp_path} has no config.json")


def test_unreachable_endpoint() -> None:
    proc = run_script("stable_prefix_vs_timestamp.py", "--quick", "--endpoint", "http://127.0.0.1:9")
    assert_one_line_error(proc, "error: cannot reach a vLLM server at http://127.0.0.1:9")


def test_cpu_block_size_must_be_a_multiple_of_32() -> None:
    proc = run_script("stable_prefix_vs_timestamp.py", "--quick", "--device", "cpu", "--block-size", "16")
    assert_one_line_error(proc, "error: --block-size 16: the CPU engine needs a multiple of 32")


def test_json_never_overwrites_a_foreign_file(tmp_path: Path) -> None:
    precious = tmp_path / "notes.json"
    precious.write_text('{"my": "data"}')
    proc = run_script("stable_prefix_vs_timestamp.py", "--quick", "--json", str(precious))
    assert_one_line_error(proc, f"error: --json {precious} exists and is not a result file")
    assert precious.read_text() == '{"my": "data"}'


def test_json_into_missing_folder(tmp_path: Path) -> None:
    target = tmp_path / "nope" / "out.json"
    proc = run_script("stable_prefix_vs_timestamp.py", "--quick", "--json", str(target))
    assert_one_line_error(proc, f"error: --json {target}: folder")


def test_run_all_unknown_lesson_number() -> None:
    proc = run_script("run_all_examples.py", "9")
    assert_one_line_error(proc, "error: unknown lesson '9'")
    assert "1, 2, 3, 4" in proc.stderr


def test_run_all_rejects_repeats_and_words() -> None:
    assert_one_line_error(run_script("run_all_examples.py", "1", "1"), "error: lesson 1 is selected twice")
    assert_one_line_error(run_script("run_all_examples.py", "x"), "error: unknown lesson 'x'")
    assert_one_line_error(run_script("run_all_examples.py", "0"), "error: unknown lesson '0'")


def test_run_all_list() -> None:
    proc = run_script("run_all_examples.py", "--list")
    assert proc.returncode == 0
    assert "stable_prefix_vs_timestamp" in proc.stdout


def test_json_that_cannot_be_written_fails_before_the_engine_starts() -> None:
    # /proc takes no new files, even for root: the lesson must not run 77 s and then fail.
    proc = run_script("stable_prefix_vs_timestamp.py", "--quick", "--json", "/proc/kvlessons-x.json")
    assert_one_line_error(proc, "error: --json /proc/kvlessons-x.json cannot be written")


@pytest.mark.skipif(detect_device() == "cuda", reason="this machine has a CUDA GPU")
def test_device_cuda_without_a_gpu_is_one_line() -> None:
    proc = run_script("stable_prefix_vs_timestamp.py", "--quick", "--device", "cuda")
    assert_one_line_error(proc, "error: --device cuda: no CUDA GPU is usable here")


def test_unknown_price_as_fails_before_the_engine_starts() -> None:
    proc = run_script("stable_prefix_vs_timestamp.py", "--quick", "--price-as", "openai:no-such-model")
    assert_one_line_error(proc, "error: unknown provider/model 'openai:no-such-model'")
