"""The command lines as a user meets them: `--help` of every command answers without importing torch, `lidr STAGE`
is `python -m lidr.cli.STAGE`, and each optional package (pyproject.toml's extras) is asked for in one sentence
before any work, or, for the trainer's curves, left out saying so. And CI's rule (tests/conftest.py): under
LIDR_NO_SKIPS=1 a skip fails, but for the machine-dependent reasons."""

import contextlib
import importlib
import io
import os
import subprocess
import sys

import pytest
from helpers import ROOT, pairs, train_args, write_jsonl

STAGES = ["generate", "translate", "pairs", "sdrrl", "train", "iterate"]  # the brief's `lidr generate|...|iterate`
DOORS = [["generate.py"], ["translate.py"], ["train_dpo.py"], ["iterate.py"], *(["-m", f"lidr.cli.{s}"] for s in STAGES),
         ["-m", "lidr.cli.main"], *(["-m", "lidr.cli.main", s] for s in STAGES)]


def imported_modules(importtime_log: str) -> set[str]:
    """The modules `python -X importtime` reports (stderr lines "import time: self | cumulative | name")."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")
            and "|" in line and not line.rstrip().endswith("imported package")}


@pytest.mark.parametrize("door", DOORS, ids=" ".join)
def test_help_never_imports_torch(door):
    proc = subprocess.run([sys.executable, "-X", "importtime", *door, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: "), proc.stderr[-2000:]
    modules = imported_modules(proc.stderr)
    assert "argparse" in modules and "lidr.cli" in modules  # the log is read right
    assert not {m for m in modules if m == "torch" or m.startswith("torch.")}


def run_main(main, argv) -> tuple[str, object]:
    """(stdout, exit code) of main(argv)."""
    out, code = io.StringIO(), 0
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as stop:
            code = stop.code
    return out.getvalue(), code


def test_lidr_lists_every_stage_and_runs_each_as_its_module(capsys):
    from lidr.cli.main import main

    listing, code = run_main(main, ["--help"])
    lines = listing.split("commands:\n")[1].splitlines()
    assert code == 0 and [line.split()[0] for line in lines] == STAGES
    modules = sorted(p.stem for p in (ROOT / "lidr" / "cli").glob("*.py") if p.stem not in ("__init__", "main"))
    assert sorted(STAGES) == modules  # every command module has its subcommand
    for stage in STAGES:
        module = importlib.import_module(f"lidr.cli.{stage}")
        assert run_main(main, [stage, "--help"]) == run_main(module.main, ["--help"])
        with pytest.raises(SystemExit) as theirs:
            module.main([])
        expected = capsys.readouterr().err
        with pytest.raises(SystemExit) as ours:
            main([stage])
        assert ours.value.code == theirs.value.code == 2 and capsys.readouterr().err == expected
    with pytest.raises(SystemExit, match=r"^lidr: 'mgsm' is not a command; the commands are generate, translate, pairs, "
                                         r"sdrrl, train, iterate \(lidr --help\)$"):
        main(["mgsm"])
    with pytest.raises(SystemExit) as stop:
        main([])
    assert stop.value.code == 2 and "commands:" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# the optional packages


def refusal(module: str, extra: str, what: str) -> str:
    return (f"{what} needs {module}, which is not installed: pip install 'lidr[{extra}]' "
            f"(in a clone: pip install -e '.[{extra}]')")


def test_check_language_without_py3langid_is_one_sentence_before_any_work(tmp_path, monkeypatch):
    import lidr.cli.iterate
    import lidr.cli.pairs

    monkeypatch.setitem(sys.modules, "py3langid", None)
    with pytest.raises(SystemExit) as stop:
        lidr.cli.pairs.main(["--dir", str(tmp_path), "--langs", "fr", "--check-language"])
    assert stop.value.code == refusal("py3langid", "langid", "--check-language")
    argv = ["--model", str(tmp_path / "M0"), "--work", str(tmp_path / "work"), "--prompts", str(tmp_path),
            "--langs", "fr", "--no-translation-tasks", "--pairs-check-language"]
    with pytest.raises(SystemExit) as stop:
        lidr.cli.iterate.main(argv)
    assert stop.value.code == refusal("py3langid", "langid", "--pairs-check-language")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_evaluations_and_the_demo_name_their_extra_before_any_work(tmp_path, monkeypatch):
    import demo
    import eval.alpacaeval
    import eval.mgsm
    import eval.report
    import world.demo_model

    for module in ("py3langid", "matplotlib", "gguf"):
        monkeypatch.setitem(sys.modules, module, None)
    out = tmp_path / "out"
    cases = [
        (eval.mgsm.main, ["--model", "M", "--data", str(tmp_path), "--langs", "fr", "--out", str(out)],
         refusal("py3langid", "langid", "eval.mgsm's off-target rate")),
        (eval.alpacaeval.main, ["generate", "--model", "M", "--prompts", str(tmp_path), "--langs", "fr", "--out",
                                str(out)], refusal("py3langid", "langid", "the off-target rate of eval.alpacaeval generate")),
        (eval.report.main, ["--model", f"M0={tmp_path}", "--out", str(out)],
         refusal("matplotlib", "plot", "eval.report's charts")),
        (demo.main, ["--quick", "--work", str(out)], refusal("matplotlib", "demo", "the demo's report charts")),
    ]
    for main, argv, sentence in cases:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == sentence
    monkeypatch.delitem(sys.modules, "matplotlib")  # installed again: the next check
    with pytest.raises(SystemExit) as stop:
        demo.main(["--quick", "--work", str(out)])
    assert stop.value.code == refusal("py3langid", "demo", "the demo's scores (off-target rates, eval/mgsm.py)")
    monkeypatch.setattr(sys, "argv", ["demo_model.py", "--out", str(out)])
    with pytest.raises(SystemExit) as stop:
        world.demo_model.main()
    assert stop.value.code == refusal("gguf", "demo", "reading the embedded SmolLM2-135M-Instruct")
    assert not out.exists()


def test_training_without_matplotlib_trains_and_says_the_curves_are_left_out(tiny_dir, tmp_path, monkeypatch, capsys):
    from lidr.cli.train import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(4))
    out = tmp_path / "run"
    main(train_args(tiny_dir, data, out, "--batch-size", "2", "--grad-accum", "2"))
    printed = capsys.readouterr().out
    assert (f"{out / 'curves.png'} will not be drawn: matplotlib is not installed (pip install 'lidr[plot]'); the "
            f"numbers are in {out / 'log.jsonl'}") in printed
    assert f"wrote {out / 'model'}\n" in printed
    assert (out / "model" / "model.safetensors").is_file() and (out / "log.jsonl").is_file()
    assert not (out / "curves.png").exists()


# -----------------------------------------------------------------------------
# CI: the README's two commands, and a skip is a failure (tests/conftest.py)


def test_ci_runs_the_readmes_install_and_test_commands_with_no_skips():
    readme = (ROOT / "README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    install_and_demo, tests = [block.split("\n", 1)[0] for block in readme.split("```bash\n")[1:3]]
    install, demo = install_and_demo.rsplit(" && ", 1)
    assert demo == "python demo.py" and tests == 'pip install -e ".[dev]" && python -m pytest tests -n 2'
    ci = [line.split("  #")[0].replace(" --quiet", "") for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci[-3:] == [install, "export LIDR_NO_SKIPS=1", tests]  # the demo runs at --quick size in the tests

SKIPPING_TESTS = """
import pytest

def test_passes():
    pass

def test_needs_a_package():
    pytest.skip("the thing needs pip install 'lidr[x]'")

@pytest.mark.skipif(True, reason="this torch has no flex attention")
def test_needs_flex():
    pass
"""


@pytest.mark.slow  # four pytest runs in subprocesses (~30 s)
@pytest.mark.parametrize("no_skips, summaries", [("1", ["1 failed, 1 passed, 1 skipped", "1 error"]),
                                                 ("", ["1 passed, 2 skipped", "1 skipped"])])
def test_in_ci_a_skip_fails_unless_the_machine_decides_it(tmp_path, no_skips, summaries):
    """tests/conftest.py loaded as a plugin into pytest runs of skipping tests (one skip in a test, one of a whole
    module at collection); pytest's own counts are the reference."""
    (tmp_path / "test_skips.py").write_text(SKIPPING_TESTS)
    (tmp_path / "test_module_skip.py").write_text(
        "import pytest\npytest.skip('../shared/data is absent', allow_module_level=True)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), LIDR_NO_SKIPS=no_skips)
    said = "and LIDR_NO_SKIPS=1 (CI) allows only the machine-dependent skips of tests/conftest.py ALLOWED_SKIPS"
    for name, summary, reason in zip(("test_skips.py", "test_module_skip.py"), summaries,
                                     ("the thing needs pip install 'lidr[x]'", "../shared/data is absent")):
        proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q",
                               "--rootdir", str(tmp_path), str(tmp_path / name)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.stdout.splitlines()[-1].split(" in ")[0] == summary, proc.stdout[-3000:]
        assert (f"skipped ({reason}), {said}" in proc.stdout) == bool(no_skips), proc.stdout[-3000:]
