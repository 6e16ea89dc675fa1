"""The installed package: a wheel holds lidr/, eval/ and the judge's protocol files, and `eval` imports
and runs from any folder after `pip install .` or `pip install -e .`, from a copy of the sources, nothing
fetched. Everything is built with the running environment's own tools (its pip and setuptools: the dev
extra), and the nested virtual environment sees the running environment's packages (its site-packages
folders, listed in a .pth file), whether the tests run in a virtual environment or in a base interpreter."""

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import ROOT

pytestmark = pytest.mark.slow  # every test here builds or installs the package

PROTOCOL_FILES = ["LICENSE", "README.md", "alpaca_eval_clf.txt", "configs.yaml"]

PROBE = """
import contextlib, io, json
import eval.alpacaeval, eval.judge, eval.mgsm, lidr, torch

def usage(main, argv):  # what `python -m eval.<module> ARGV` prints
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(argv)
    return out.getvalue()

print(json.dumps({"eval": eval.mgsm.__file__, "lidr": lidr.__file__, "torch": torch.__file__,
                  "prompt": str(eval.judge.TEMPLATE_PATH),
                  "messages": eval.judge.judge_messages("Q?", "a", "b"),
                  "help": [usage(eval.mgsm.main, ["--help"]), usage(eval.alpacaeval.main, ["judge", "--help"])]}))
"""


def source_copy(folder: Path) -> Path:
    """What `pip install .` reads from the repository, without its caches, builds or tests."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, folder / name)
    for package in ("lidr", "eval", "world"):
        shutil.copytree(ROOT / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def pip(*args, cwd):
    """This environment's pip, offline; --no-build-isolation: the build uses this environment's setuptools."""
    proc = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "--no-build-isolation",
                           "--disable-pip-version-check", "-q"], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def nested_environment(env_dir: Path) -> Path:
    """A fresh virtual environment made by this interpreter's venv module that sees this environment's packages.

    venv's system_site_packages would show the base interpreter's packages, not a virtual environment's;
    instead the site-packages folders on this interpreter's path go into a .pth file (plain paths, so
    the .pth files there, such as an editable install of this checkout, stay inactive). The nested
    environment's own site-packages comes first, so what is installed there wins.
    """
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site_dir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    Path(site_dir, "_running_environment.pth").write_text("".join(p + "\n" for p in ours))
    return python


def run_elsewhere(python: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_wheel_holds_every_eval_module_and_the_judge_prompt(tmp_path):
    (tmp_path / "src").mkdir()
    source = source_copy(tmp_path / "src")
    pip("wheel", "-w", str(tmp_path / "wheels"), str(source), cwd=tmp_path)
    [wheel] = (tmp_path / "wheels").glob("lidr-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"eval/{p.name}" for p in (ROOT / "eval").glob("*.py")}
    expected |= {f"eval/weighted_alpaca_eval_gpt4_turbo_multilingual/{name}" for name in PROTOCOL_FILES}
    expected |= {f"lidr/{p.name}" for p in (ROOT / "lidr").glob("*.py")}
    assert expected <= names, sorted(expected - names)
    prompt = "eval/weighted_alpaca_eval_gpt4_turbo_multilingual/alpaca_eval_clf.txt"
    assert zipfile.ZipFile(wheel).read(prompt) == (ROOT / prompt).read_bytes()


@pytest.mark.parametrize("editable", [False, True], ids=["pip-install", "pip-install-e"])
def test_eval_imports_and_runs_from_another_folder(tmp_path, editable):
    (tmp_path / "src").mkdir()
    source = source_copy(tmp_path / "src")
    env_dir = tmp_path / "venv"
    python = nested_environment(env_dir)
    pip("--python", str(python), "install", *(["-e"] if editable else []), str(source), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    probe = run_elsewhere(python, ["-c", PROBE], elsewhere)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    home = source if editable else env_dir
    assert found["torch"] == torch.__file__  # the running environment's packages, a virtual environment's included
    for key in ("eval", "lidr", "prompt"):
        assert Path(found[key]).resolve().is_relative_to(home.resolve()), (key, found[key])
    assert Path(found["prompt"]).read_bytes() == (ROOT / "eval" / "weighted_alpaca_eval_gpt4_turbo_multilingual"
                                                  / "alpaca_eval_clf.txt").read_bytes()
    [system, user] = found["messages"]
    assert system["role"] == "system" and system["content"].startswith("You are a highly efficient assistant")
    assert user["role"] == "user" and '"instruction": """Q?""",' in user["content"]

    assert all(text.startswith("usage:") for text in found["help"]), found["help"]
    script = run_elsewhere(python, [str(source / "eval" / "mgsm.py"), "--help"], elsewhere)
    assert script.returncode == 0 and script.stdout.startswith("usage: mgsm.py"), script.stderr[-2000:]
    for module in ("lidr.cli.generate", "lidr.cli.translate", "lidr.cli.train"):  # what iterate.py launches under torchrun
        command = run_elsewhere(python, ["-m", module, "--help"], elsewhere)
        assert command.returncode == 0 and command.stdout.startswith("usage: "), (module, command.stderr[-2000:])
