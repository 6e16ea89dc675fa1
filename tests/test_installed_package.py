"""The installed package: the wheel holds lidr/ alone (eval/, world/ and demo.py stay in the clone, so no
top-level `eval` or `world` clashes with other projects), and after `pip install .` or `pip install -e .`
the `lidr` command and `python -m lidr.cli.*` (what torchrun launches) run from any folder, from a copy of
the sources, nothing fetched; eval runs from the clone. Everything is built with the running environment's
own tools (its pip and setuptools: the dev extra), and the nested virtual environment sees the running
environment's packages (its site-packages folders, listed in a .pth file), whether the tests run in a
virtual environment or in a base interpreter."""

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

STAGES = ["generate", "translate", "pairs", "sdrrl", "train", "iterate"]  # `lidr STAGE`: lidr/cli/STAGE.py

PROBE = """
import importlib.util, json
import lidr, torch

print(json.dumps({"lidr": lidr.__file__, "torch": torch.__file__,
                  "clashing": [name for name in ("eval", "world", "demo") if importlib.util.find_spec(name)]}))
"""


def source_copy(folder: Path) -> Path:
    """What `pip install .` reads from the repository, without its caches, builds or tests."""
    for name in ("pyproject.toml", "README.md", "demo.py"):
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


def test_the_wheel_holds_lidr_alone_and_the_lidr_command(tmp_path):
    (tmp_path / "src").mkdir()
    source = source_copy(tmp_path / "src")
    pip("wheel", "-w", str(tmp_path / "wheels"), str(source), cwd=tmp_path)
    [wheel] = (tmp_path / "wheels").glob("lidr-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {name.split("/")[0] for name in names} == {"lidr", "lidr-0.1.0.dist-info"}
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "lidr").rglob("*.py")}  # the method, cli, harness, kernels
    assert expected <= names, sorted(expected - names)
    entry_points = zipfile.ZipFile(wheel).read("lidr-0.1.0.dist-info/entry_points.txt").decode()
    assert "[console_scripts]\nlidr = lidr.cli.main:main" in entry_points


def help_body(text: str) -> str:
    """A --help text less its usage lines (argparse wraps them after the program's name, which differs)."""
    return text.split("\n\n", 1)[1]


@pytest.mark.parametrize("editable", [False, True], ids=["pip-install", "pip-install-e"])
def test_lidr_runs_from_another_folder_and_eval_from_the_clone(tmp_path, editable):
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
    assert Path(found["lidr"]).resolve().is_relative_to(home.resolve()), found["lidr"]
    assert found["clashing"] == []  # no top-level eval, world or demo on the path

    lidr = env_dir / "bin" / "lidr"  # the console script pip made
    listing = run_elsewhere(lidr, ["--help"], elsewhere)
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert [line.split()[0] for line in listing.stdout.split("commands:\n")[1].splitlines()] == STAGES
    for stage in STAGES:
        command = run_elsewhere(lidr, [stage, "--help"], elsewhere)
        assert command.returncode == 0 and command.stdout.startswith(f"usage: lidr {stage} "), command.stderr[-2000:]
        module = run_elsewhere(python, ["-m", f"lidr.cli.{stage}", "--help"], elsewhere)  # what torchrun launches
        assert module.returncode == 0 and help_body(module.stdout) == help_body(command.stdout), stage
    unknown = run_elsewhere(lidr, ["mgsm"], elsewhere)
    assert unknown.returncode == 1 and unknown.stderr == (f"lidr: 'mgsm' is not a command; the commands are "
                                                          f"{', '.join(STAGES)} (lidr --help)\n")

    gone = run_elsewhere(python, ["-m", "eval.mgsm", "--help"], elsewhere)
    assert gone.returncode == 1 and "No module named 'eval'" in gone.stderr
    clone = run_elsewhere(python, ["-m", "eval.mgsm", "--help"], source)  # eval runs from the clone
    assert clone.returncode == 0 and clone.stdout.startswith("usage: "), clone.stderr[-2000:]
