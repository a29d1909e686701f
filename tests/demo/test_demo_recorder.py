"""The recorder on its own (no server): a file that plays back with the frames' real timing, clear errors."""

from __future__ import annotations

import time

import numpy as np
import pytest

from demo.recorder import Recorder, RecordingError


def test_frames_keep_their_real_timing(tmp_path):
    av = pytest.importorskip("av")
    rec = Recorder(str(tmp_path / "made-on-first-use"), 64, 48)
    assert rec.status()["recording"] is False and not (tmp_path / "made-on-first-use").exists()
    rec.start()
    for i in range(4):
        rec.add(np.full((48, 64, 3), 40 * i, np.uint8))
        time.sleep(0.1)  # at least 100 ms between frames (a lower bound: never a pace the test relies on)
    last = rec.stop()["last"]
    assert last["frames"] == 4 and last["dropped"] == 0 and last["error"] == ""
    with av.open(str(rec.path_of(last["file"]))) as container:
        frames = list(container.decode(video=0))
    assert [f.to_ndarray(format="rgb24").shape for f in frames] == [(48, 64, 3)] * 4
    gaps = np.diff([f.time for f in frames])
    assert (gaps >= 0.099).all(), gaps
    rec.add(np.zeros((48, 64, 3), np.uint8))  # not recording: ignored
    assert rec.status()["frames"] == 4


def test_errors_name_the_problem(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(RecordingError, match="cannot make the recordings folder .*a-file"):
        Recorder(str(blocker / "sub"), 64, 64).start()
    rec = Recorder(str(tmp_path), 64, 64)
    with pytest.raises(RecordingError, match="not recording"):
        rec.stop()
    rec.start()
    with pytest.raises(RecordingError, match="already recording"):
        rec.start()
    rec.close()  # finishes the recording; with no frame there is no file to offer
    last = rec.status()["last"]
    assert rec.status()["recording"] is False and (last["frames"], last["url"]) == (0, None)
    assert "no output frames arrived" in last["error"] and not list(tmp_path.glob("*.mp4"))
    assert rec.path_of("../etc/passwd") is None and rec.path_of("rtdiffusion-20000101-000000.mp4") is None
