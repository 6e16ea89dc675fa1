"""The layout the README promises: the method in lidr/*.py (short, no locks or records), the machinery beside
it, no import circle, and one prompt's path from the iteration to the sampler step and to the loss in 6 frames."""

import ast
import json
import traceback
from pathlib import Path

from helpers import ROOT, write_jsonl

METHOD = sorted((ROOT / "lidr").glob("*.py"))
# what keeps outputs safe: no method file may call these (lidr/harness/outputs.py)
SAFETY = {"hold_lock", "check_output", "record_output", "bind_outputs", "check_folder", "remove_own_output",
          "write_json_atomic", "write_text_atomic", "ResumableWriter", "folder_identity", "file_identity"}


def lidr_imports(path: Path) -> set[str]:
    """The lidr modules a file imports at module level (`from lidr.x import y` names lidr.x.y when it is a module)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name.startswith("lidr") and module_path(name) is not None}
    return found


def module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def test_the_method_is_short_and_every_file_says_what_it_does():
    sizes = {path.name: len(path.read_text().splitlines()) for path in METHOD}
    assert sum(sizes.values()) <= 2500, sizes
    assert max(sizes.values()) <= 400, sizes
    for path in METHOD:
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
        assert path.name == "__init__.py" or (doc and len(doc.splitlines()) <= 15), path


def test_no_method_file_takes_a_lock_or_writes_a_record():
    for path in METHOD:
        tree = ast.parse(path.read_text())
        used = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
        assert not used & SAFETY, (path.name, used & SAFETY)


def test_no_import_circle():
    modules = {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
               for path in (ROOT / "lidr").rglob("*.py")}
    graph = {name: {m.removesuffix(".__init__") for m in lidr_imports(path)} - {name} for name, path in modules.items()}
    graph = {name: {m for m in deps if m in modules} for name, deps in graph.items()}
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", " -> ".join([*trail, name])
        state[name] = "open"
        for dep in sorted(graph[name]):
            visit(dep, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])


def lidr_frames(stack: list, outer: str, inner: str) -> list[str]:
    """The functions of lidr's own files from the one named `outer` to `inner`, both included, in a captured
    stack (torch's decorator frames, such as inference mode's generator wrapper, are not lidr's)."""
    names = [frame.name for frame in stack if "/torch/" not in frame.filename]
    return names[names.index(outer) : names.index(inner) + 1]


def test_one_prompt_reaches_the_sampler_step_and_the_loss_in_six_frames(tiny_dir, tmp_path, monkeypatch):
    """An in-process iteration on the tiny model, the sampler's decode step and the loss recording their stacks;
    the model is loaded once for all of the iteration's generation and translation."""
    import lidr.dpo
    import lidr.kernels.cache
    import lidr.train
    from dataclasses import replace

    from lidr import settings
    from lidr.iterate import Recipe, run

    stacks = {}
    decode, loss = lidr.kernels.cache.Session.decode, lidr.train.preference_loss

    def recording_decode(self, *args, **kwargs):
        stacks.setdefault("decode", traceback.extract_stack())
        return decode(self, *args, **kwargs)

    def recording_loss(*args, **kwargs):
        stacks.setdefault("loss", traceback.extract_stack())
        return loss(*args, **kwargs)

    import lidr.harness.sampled

    loads, load = [], lidr.harness.sampled.load

    def counting_load(folder, *args, **kwargs):
        loads.append(folder)
        return load(folder, *args, **kwargs)

    monkeypatch.setattr(lidr.harness.sampled, "load", counting_load)
    monkeypatch.setattr(lidr.kernels.cache.Session, "decode", recording_decode)
    monkeypatch.setattr(lidr.train, "preference_loss", recording_loss)
    prompts = tmp_path / "prompts"
    for lang in ("en", "fr"):
        write_jsonl(prompts / f"{lang}.jsonl", [{"id": str(i), "instruction": f"Question {i}?"} for i in range(4)])
    short = replace(settings.ANSWERS, max_new_tokens=4)
    recipe = Recipe(langs=("fr",), answers=short, translation=replace(settings.TRANSLATION, max_new_tokens=4),
                    training=replace(settings.TRAINING, batch_size=1, max_len=96))
    # the tiny random model's translations fail: pairs come from a file written as if the stage made them
    import lidr.iterate

    def made_pairs(folder, langs, options, task_ids):
        rows = [{"id": str(i), "lang": "fr", "direction": "non_dominant", "prompt": f"Question {i}?",
                 "chosen": f"Answer {i}.", "rejected": f"Wrong {i}."} for i in range(4)]
        return rows, {"departures_from_reference": [], "per_language": {}, "made_from": {"test": True}}

    monkeypatch.setattr(lidr.iterate, "pairs_from_dir", made_pairs)
    [m1] = run(tiny_dir, [prompts], tmp_path / "work", recipe)
    assert (m1 / "config.json").is_file()
    # the decode step (Session.decode, recorded in its place) and step_losses, where the batch's log-probs meet
    # the loss (it calls dpo.preference_loss, recorded)
    assert lidr_frames(stacks["decode"], "run_iteration", "recording_decode") == [
        "run_iteration", "generate", "generate_file", "sample", "completions", "recording_decode"]
    assert lidr_frames(stacks["loss"], "run_iteration", "step_losses") == [
        "run_iteration", "train", "run", "steps", "train_step", "step_losses"]
    assert json.loads((tmp_path / "work" / "iter1" / "done" / "train").read_text())["result"] == str(m1)
    assert loads == [tiny_dir]  # M_t loaded once for the iteration's 2 generations and 2 translations
