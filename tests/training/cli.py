"""The training CLI as the tests in this folder call it: a tiny MLP run, and the check that a run fails
before any work."""
from __future__ import annotations

from flowmap_kernels import train

TINY = ["--width", "16", "--depth", "1", "--batch", "16", "--no-progress", "--threads", "1", "--no-eval",
        "--lr-schedule", "constant"]


def run(out, *extra) -> int:
    """``python -m flowmap_kernels.train --out OUT`` with the TINY flags and ``extra``; its exit status."""
    return train.main(["--out", str(out), *TINY, *extra])


def fails_upfront(tmp_path, capsys, flags, named) -> str:
    """The run exits with 2 and `error: <named>...` before creating its output folder; returns the message."""
    out = tmp_path / "never"
    assert run(out, "--steps", "2", *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {named}"), err
    assert not out.exists()
    return err
