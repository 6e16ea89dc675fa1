"""The console of a long stage (lidr/harness/progress.py): a bar on a terminal, plain lines at a steady interval elsewhere."""

import io

from lidr.harness.progress import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_file_gets_a_plain_line_every_tenth_and_every_30_seconds():
    stream, clock = io.StringIO(), Clock()
    progress = Progress(100, "train", stream=stream, clock=clock)
    for step in range(1, 101):
        clock.now += 1.0 if step <= 50 else 0.01  # 1 s per step, then fast
        progress.update(1, loss=1 / step)
        if step == 35:
            progress.write("held-out pairs at step 35: ...")
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # steps 10, 20, ..., 100 (a tenth each): 10 lines, and the message where it was written
    assert [line.split(" ")[1] for line in lines if line.startswith("train:")] == [f"{n}/100" for n in range(10, 101, 10)]
    assert lines[3] == "held-out pairs at step 35: ..."
    assert lines[0] == "train: 10/100 (10%), 1 it/s, 90 s left; loss=0.1"
    assert lines[-1].startswith("train: 100/100 (100%), ") and lines[-1].endswith("; loss=0.01")
    assert "left" not in lines[-1]

    slow, clock = io.StringIO(), Clock()  # 1,000 steps of 4 s: a line every 30 s, long before a tenth
    progress = Progress(1000, "sample", initial=200, stream=slow, clock=clock)
    for _ in range(20):
        clock.now += 4.0
        progress.update(1)
    assert [line.split(",")[0] for line in slow.getvalue().splitlines()] == ["sample: 208/1000 (21%)",
                                                                             "sample: 216/1000 (22%)"]
    assert "4 s/it" in slow.getvalue() and "3168 s left" in slow.getvalue()  # the rate counts this run's steps only


def test_a_terminal_gets_one_bar_with_the_numbers_in_its_postfix():
    stream = Terminal()
    progress = Progress(4, "train", stream=stream)
    for step in range(4):
        progress.update(1, loss=0.6931 - step / 10, acc=0.75)
    progress.write("a message")
    progress.close()
    text = stream.getvalue()
    assert "\r" in text and "train: 100%" in text and "4/4" in text
    assert "loss=0.3931, acc=0.75" in text and "a message\n" in text
    assert "train: 4/4 (" not in text  # no plain lines on a terminal


def test_other_ranks_print_nothing():
    stream = io.StringIO()
    progress = Progress(3, "train", enabled=False, stream=stream)
    for _ in range(3):
        progress.update(1, loss=0.5)
    progress.write("message")
    progress.close()
    assert stream.getvalue() == ""
