"""launch/gpu_check.sh: its dry run on CPU (so it cannot rot), its plan, install rules, budgets and exit status."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nanotrain import gpu_check
from nanotrain.gpu_check import Part, exit_status, install_commands, plan, read_test_results, run_child
from test_checkpoint import REPO, SUBPROCESS_TIMEOUT, subprocess_env
from test_cuda import NO_CUDA


def test_the_dry_run_runs_every_part_on_cpu_and_writes_one_summary(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run(["bash", "launch/gpu_check.sh", str(out), "--dry_run"], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    parts = {part["name"]: part for part in summary["parts"]}
    assert list(parts) == ["install", "cuda-tests", "bench-20m", "bench-125m", "bench-20m-big"]
    assert all(part["status"] == "passed" for part in parts.values()), parts
    assert all((out / f"{name}.log").stat().st_size > 0 for name in parts)
    assert parts["install"]["detail"]["commands"], "the install commands are logged in a dry run"
    tests = parts["cuda-tests"]["detail"]
    assert len(tests["tests"]) >= 10 and tests["counts"] == {"skipped": len(tests["tests"])}
    assert tests["skip_reasons"] == [NO_CUDA]
    bench = parts["bench-20m"]["detail"]
    assert [side["name"] for side in bench["sides"]] == ["nanotrain", "HF LlamaForCausalLM"] and bench["ratio"] > 0
    assert parts["bench-125m"]["detail"]["profile"]["nanotrain"], "the profile summary is in the report"
    assert summary["projection"]["hours"] > 0
    table = (out / "summary.md").read_text()
    assert "| cuda-tests | passed |" in table and "The reproduction's ~110M tokens" in table
    assert table in result.stdout  # the same table is printed


def test_the_gpu_plan_fits_8_minutes_and_benchmarks_what_the_issue_asks(tmp_path):
    parts = plan(tmp_path, dry_run=False)
    assert sum(part.budget_s for part in parts) == gpu_check.TOTAL_BUDGET_S == 480
    commands = {part.name: " ".join(part.argv) for part in parts}
    assert "-m pytest -m cuda" in commands["cuda-tests"] and "tests/test_cuda.py" in commands["cuda-tests"]
    for name in ("bench-20m", "bench-125m", "bench-20m-big"):
        assert "--device cuda --precision bf16 --compile" in commands[name], name
    bench_20m = commands["bench-20m"]
    assert "--config tinystories-20m --seq_len 256" in bench_20m and "--reference" not in bench_20m
    assert "--shape llama-125m --seq_len 1024" in commands["bench-125m"] and "--profile" in commands["bench-125m"]


def test_install_never_touches_torch_and_takes_local_wheels_only_when_given(tmp_path, monkeypatch):
    constraints = tmp_path / "constraints.txt"
    with_wheels = install_commands(["transformers", "pytest"], tmp_path / "wheels", constraints)
    assert len(with_wheels) == 2 and all("torch" not in command[-1] for command in with_wheels)
    assert all(command[command.index("--constraint") + 1] == str(constraints) for command in with_wheels)
    assert with_wheels[0][-2:] == ["transformers", "pytest"] and "--no-index" in with_wheels[0]
    assert with_wheels[1][-4:] == ["--no-deps", "--no-build-isolation", "-e", str(REPO)]
    nothing_missing = install_commands([], None, constraints)
    assert len(nothing_missing) == 1 and "--no-deps" in nothing_missing[0]  # only the project itself
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None if name == "transformers" else True)
    assert gpu_check.missing_requirements() == ["transformers"]


def test_a_part_over_its_budget_is_killed_and_marked(tmp_path):
    part = Part("slow", 1, [sys.executable, "-c", "import time; time.sleep(60)"], "bench")
    run_child(part, timeout_s=1, log_file=tmp_path / "slow.log")
    assert part.status == "timed out" and "killed after 1 s" in (tmp_path / "slow.log").read_text()


def test_pytest_output_is_read_even_when_cut_off():
    log = ("tests/test_cuda.py::test_a PASSED   [ 10%]\n"
           "tests/test_cuda.py::test_b[bf16] FAILED   [ 20%]\n"
           "tests/test_cuda.py::test_c SKIPPED (needs a GPU)   [ 30%]\n")
    results = read_test_results(log)
    assert results["tests"] == {"tests/test_cuda.py::test_a": "passed", "tests/test_cuda.py::test_b[bf16]": "failed",
                                "tests/test_cuda.py::test_c": "skipped"}
    assert results["counts"] == {"passed": 1, "failed": 1, "skipped": 1}


@pytest.mark.parametrize("tests, bench, status", [
    ("passed", "passed", 0),
    ("failed", "passed", 1),  # a CUDA test failed
    ("timed out", "passed", 1),  # the tests did not finish: nothing proven
    ("passed", "timed out", 3),  # only a benchmark
])
def test_the_exit_status_says_whether_a_cuda_test_failed(tests, bench, status):
    parts = [Part("install", 1, [], "install", status="passed"), Part("cuda-tests", 1, [], "tests", status=tests),
             Part("bench-20m", 1, [], "bench", status=bench)]
    assert exit_status(parts) == status


def test_bad_arguments_are_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main([str(tmp_path), "--wheels", str(tmp_path / "none")])
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: --wheels")
