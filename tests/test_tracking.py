"""--report-to (lidr/harness/tracking.py): the numbers mirrored to TensorBoard and wandb, read back from their own files."""

import json
import struct
import sys

import pytest
from helpers import tensorboard_scalars

from lidr.harness.tracking import Tracker


def wandb_history(folder) -> list[dict]:
    """The history rows of the offline wandb run under `folder`, read from its .wandb file (a leveldb-style log
    of 32 KiB blocks, records framed as crc32, length, kind; wandb's own protobuf Record inside)."""
    from wandb.proto import wandb_internal_pb2

    [path] = folder.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, block, records, pending = path.read_bytes(), 7, 32768, [], b""  # 7: the file's header
    while pos + 7 <= len(data):
        room = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if room >= 7 else (0, 0, 0)
        if kind == 0:  # the padding at a block's end
            pos += room
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            records.append(pending)
            pending = b""
    history = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    return history


def test_tensorboard_holds_every_scalar_and_a_resume_replaces_the_redone_steps(tmp_path):
    tracker = Tracker("tensorboard", tmp_path, config={})
    for step in (1, 2, 3):
        tracker.log({"loss": 1.0 / step, "eval/es/margin": 0.5 * step}, step)
    tracker.close()
    resumed = Tracker("tensorboard", tmp_path, config={}, first_step=3)  # resumed from step 2's checkpoint
    resumed.log({"loss": 0.25, "eval/es/margin": 7.0}, 3)
    resumed.close()
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert scalars["eval/es/margin"] == [(1, 0.5), (2, 1.0), (3, 7.0)]


@pytest.mark.slow  # starts wandb's service process (~7 s)
def test_wandb_offline_holds_every_scalar(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="pip install 'lidr[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = Tracker("wandb", tmp_path, config={"beta": 0.1})
    tracker.log({"loss": 0.5, "eval/es/margin": 0.25}, 1)
    tracker.log({"loss": 0.125}, 2)
    tracker.close()
    wandb.teardown()  # the wandb service writes the run's file; stopping it flushes the file
    history = wandb_history(tmp_path)
    assert [(row["_step"], row["loss"], row.get("eval/es/margin")) for row in history] == [(1, 0.5, 0.25),
                                                                                           (2, 0.125, None)]


@pytest.mark.parametrize("report_to, extra", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_package_is_one_sentence(report_to, extra, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SystemExit, match=rf"--report-to {report_to} needs the {report_to} package: "
                                         rf"pip install 'lidr\[{extra}\]'"):
        Tracker(report_to, tmp_path, config={})
    Tracker("none", tmp_path, config={}).log({"loss": 1.0}, 1)  # none mirrors nothing and needs nothing
    assert list(tmp_path.iterdir()) == []


def missing_trackers(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def test_the_trainer_refuses_a_missing_tracker_before_any_work(tiny_dir, data, tmp_path, monkeypatch):
    """Found missing when the first step is logged, it cost the reference pass over every pair."""
    from helpers import train_args

    import lidr.harness.training
    from lidr.cli.train import main

    missing_trackers(monkeypatch)
    monkeypatch.setattr(lidr.harness.training, "reference_logps", lambda *a, **k: pytest.fail("the reference pass ran"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"--report-to wandb needs the wandb package: pip install 'lidr\[wandb\]'"):
        main(train_args(tiny_dir, data, out, "--report-to", "wandb"))
    assert list(tmp_path.iterdir()) == []  # not even the run folder


def test_iterate_refuses_a_missing_tracker_before_the_first_stage(tiny_dir, tmp_path, monkeypatch):
    """Found missing at the train stage, it cost an iteration's generation and translation."""
    from helpers import write_jsonl

    from lidr.cli.iterate import main

    missing_trackers(monkeypatch)
    for lang in ("en", "fr"):
        write_jsonl(tmp_path / "prompts" / f"{lang}.jsonl", [{"id": 1, "instruction": "Say hi."}])
    work = tmp_path / "work"
    with pytest.raises(SystemExit, match=r"--report-to tensorboard needs the tensorboard package"):
        main(["--model", str(tiny_dir), "--work", str(work), "--prompts", str(tmp_path / "prompts"), "--langs", "fr",
              "--no-translation-tasks", "--max-new-tokens", "2", "--translate-max-new-tokens", "2", "--",
              "--report-to", "tensorboard"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts"]  # no WORK, no lock beside it


def test_iterate_refuses_a_missing_eval_data_file_before_the_first_stage(tiny_dir, tmp_path):
    from helpers import write_jsonl

    from lidr.cli.iterate import main

    for lang in ("en", "fr"):
        write_jsonl(tmp_path / "prompts" / f"{lang}.jsonl", [{"id": 1, "instruction": "Say hi."}])
    with pytest.raises(SystemExit, match=r"held-out\.jsonl: no such file or folder \(the trainer's --eval-data\)"):
        main(["--model", str(tiny_dir), "--work", str(tmp_path / "work"), "--prompts", str(tmp_path / "prompts"),
              "--langs", "fr", "--no-translation-tasks", "--max-new-tokens", "2", "--",
              "--eval-data", str(tmp_path / "held-out.jsonl")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts"]
