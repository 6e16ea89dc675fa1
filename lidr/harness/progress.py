"""What a long stage shows on the console: one progress bar on a terminal, plain lines elsewhere.

    progress = Progress(total_steps, "train", initial=start, enabled=rank == 0)
    progress.update(1, loss=0.6931, acc=0.75)   # one step done; the numbers beside the bar
    progress.write("eval @ step 10: ...")      # a line above the bar (or among the plain lines)
    progress.close()

On a terminal (the stream is a tty) this is one tqdm bar with the key numbers in its postfix. In
a log file or CI, where a bar becomes a wall of carriage returns, it prints a plain line instead,

    train: 30/100 (30%), 1.2 it/s, 58 s left; loss=0.6931 acc=0.75

when `every_seconds` (30) have passed since the last line or another `every_fraction` (10%) of the
total is done, and once at the end. Per-step records belong in a stage's log file, not here.
"""

import sys
import time


class Progress:
    """One stage's progress: a bar on a terminal, a plain line at a steady interval elsewhere."""

    def __init__(self, total: int, desc: str, initial: int = 0, enabled: bool = True, stream=None,
                 every_seconds: float = 30.0, every_fraction: float = 0.1, clock=time.monotonic):
        self.total, self.desc, self.done, self.enabled = total, desc, initial, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.every_seconds, self.every_fraction, self.clock = every_seconds, every_fraction, clock
        self.postfix = {}
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, file=self.stream, dynamic_ncols=True)
        self.started_at = self.last_line_at = clock()
        self.started_from = self.last_line_done = initial

    def update(self, n: int = 1, **postfix):
        """n more units done; postfix: the key numbers to show (floats get 4 significant digits)."""
        self.done += n
        self.postfix = {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in postfix.items()}
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(n)
            return
        now = self.clock()
        step_due = self.total and (self.done - self.last_line_done) >= self.every_fraction * self.total
        if now - self.last_line_at >= self.every_seconds or step_due or self.done == self.total:
            self.write(self.line(now))
            self.last_line_at, self.last_line_done = now, self.done

    def line(self, now: float) -> str:
        """"desc: done/total (pct), rate, time left; key=value ..." """
        text = f"{self.desc}: {self.done}/{self.total}"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        elapsed, done_here = now - self.started_at, self.done - self.started_from
        if elapsed > 0 and done_here > 0:
            rate = done_here / elapsed
            text += f", {rate:.3g} it/s" if rate >= 1 else f", {1 / rate:.3g} s/it"
            if self.total and self.done < self.total:
                text += f", {(self.total - self.done) / rate:.0f} s left"
        if self.postfix:
            text += "; " + " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return text

    def write(self, message: str):
        """A line of its own, above the bar on a terminal."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
