"""Experiment tracking: every number a run logs, mirrored to TensorBoard or Weights & Biases.

    tracker = Tracker("tensorboard", out, config=provenance(options), first_step=start + 1)   # rank 0 only
    tracker.log({"loss": 0.69, "eval/es/margin": 0.1}, step=12)
    tracker.close()

"none" (train_dpo.py's default) mirrors nothing. "tensorboard" writes OUT/tensorboard (torch's
SummaryWriter; needs `pip install 'lidr[tensorboard]'`); a resumed run first drops the events from
first_step on, which it logs again. "wandb" logs to the run named after OUT (`pip install
'lidr[wandb]'`; WANDB_PROJECT, WANDB_MODE=offline and the rest of wandb's environment apply),
with the same id on a resume, so the redone steps land in the same run. log.jsonl stays the record.
`tracker_package` imports what --report-to needs: the trainer and iterate.py call it before any work.
"""

import hashlib
import os
from pathlib import Path

from lidr.settings import REPORT_TO


def tracker_package(report_to: str):
    """What `report_to` mirrors through, imported (SummaryWriter, the wandb module; None for "none"), or
    one sentence when it is not installed. The trainer and iterate.py call it before any work: a
    missing package found when the first step is logged costs the reference pass, or an iteration."""
    if report_to not in REPORT_TO:
        raise ValueError(f"report_to {report_to!r} is not one of {', '.join(REPORT_TO)}")
    try:
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter
        if report_to == "wandb":
            import wandb

            return wandb
    except ImportError as e:
        raise SystemExit(f"--report-to {report_to} needs the {report_to} package: pip install 'lidr[{report_to}]', "
                         f"or leave --report-to out ({e})") from None
    return None


class Tracker:
    """The scalars of a run, mirrored to `report_to` (one of REPORT_TO); call it on rank 0 only."""

    def __init__(self, report_to: str, out: Path, config: dict, first_step: int = 1):
        self.report_to, self.writer = report_to, None
        package = tracker_package(report_to)
        if report_to == "tensorboard":
            self.writer = package(log_dir=str(out / "tensorboard"), purge_step=first_step)
        elif report_to == "wandb":
            run_id = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]  # a rerun of OUT continues its run
            self.writer = package.init(project=os.environ.get("WANDB_PROJECT", "lidr"), name=out.name, id=run_id,
                                       dir=str(out), config=config, resume="allow")

    def log(self, scalars: dict, step: int):
        if self.report_to == "tensorboard":
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        elif self.report_to == "wandb":
            self.writer.log(scalars, step=step)

    def close(self):
        if self.report_to == "tensorboard":
            self.writer.close()
        elif self.report_to == "wandb":
            self.writer.finish()
