"""Recording served inputs: a sample of the rows, whole files only, disk use under the cap, and
what it writes is what ``--inputs`` reads back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from parm.data import load_inputs
from parm.errors import ConfigError
from parm.serving.recorder import InputRecorder, RecordSpec


def test_records_about_the_fraction_asked_and_reads_back_as_inputs(tmp_path: Path) -> None:
    recorder = InputRecorder(RecordSpec(tmp_path / "rec", fraction=0.25, rows_per_file=100), seed=0)
    sent = torch.randn(2000, 1, 28, 28)
    for i in range(0, 2000, 10):
        recorder.offer(sent[i:i + 10])
    recorder.close()
    files = sorted((tmp_path / "rec").glob("inputs-*.npy"))
    assert files and not list((tmp_path / "rec").glob(".*.tmp"))  # whole files only
    back = load_inputs(tmp_path / "rec", (1, 28, 28), (0.0,), (1.0,))  # float: taken as served
    assert 400 <= len(back) <= 600 and recorder.recorded == len(back) and recorder.dropped == 0
    sent_rows = {row.numpy().tobytes() for row in sent}
    assert all(row.numpy().tobytes() in sent_rows for row in back)  # copies of served rows, unchanged


def test_disk_use_stays_under_the_cap_oldest_files_go_first(tmp_path: Path) -> None:
    row_bytes = 784 * 4
    cap = 5 * 50 * row_bytes  # room for about five files of 50 rows
    recorder = InputRecorder(RecordSpec(tmp_path, fraction=1.0, max_bytes=cap, rows_per_file=50), seed=0)
    for i in range(40):
        recorder.offer(torch.full((25, 1, 28, 28), float(i)))
    recorder.close()
    files = sorted(tmp_path.glob("inputs-*.npy"))
    assert sum(f.stat().st_size for f in files) <= cap and recorder.files_deleted > 0
    last = np.load(files[-1])
    assert last[-1].max() == 39.0  # the newest rows are kept


def test_close_writes_what_is_buffered(tmp_path: Path) -> None:
    recorder = InputRecorder(RecordSpec(tmp_path, fraction=1.0, rows_per_file=10_000), seed=0)
    recorder.offer(torch.ones(3, 4))
    recorder.close()
    (only,) = tmp_path.glob("inputs-*.npy")
    assert np.load(only).shape == (3, 4)


@pytest.mark.parametrize("kw", [{"fraction": 0.0}, {"fraction": 1.5}, {"max_bytes": 0}])
def test_bad_settings_are_refused(tmp_path: Path, kw: dict) -> None:
    with pytest.raises(ConfigError):
        RecordSpec(tmp_path, **kw)
