"""ControlNet and IP-Adapter flags of `rtdiffusion run` / `td`: real runs write valid files (tiny random models,
real processes), and bad values are one-line errors naming the flag, given before anything loads where they
can be."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

av = pytest.importorskip("av")
Image = pytest.importorskip("PIL.Image")

CLI = [sys.executable, "-c", "import sys; from rtdiffusion.cli import main; sys.exit(main(sys.argv[1:]))"]
CPU = ["--device", "cpu", "--threads", "1"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}  # this checkout, installed or not


def pictures(folder, n, size=64, seed=0):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_run_with_controlnets_and_a_control_video_and_with_an_ip_adapter(tmp_path):
    """Both runs at once (each is mostly start-up). The control video (2 pictures) is shorter than --frames 3:
    the run ends with it, saying so, and the file plays."""
    control = pictures(tmp_path / "edges", 2)
    styles = pictures(tmp_path / "styles", 2, seed=1)
    runs = {
        "cn": [*CLI, "run", "--model", "random:tiny", *CPU, "--input", "synthetic", "--frames", "3",
               "--controlnet", "random:controlnet-tiny:external:0.8", "--controlnet", "random:controlnet-tiny:canny:0.5",
               "--control-video", str(control), "--output", "cn.mp4"],
        "ip": [*CLI, "run", "--model", "random:tiny-sd15", *CPU, "--input", "synthetic", "--frames", "2",
               "--ip-adapter", "random:ip-adapter-tiny", "--ip-adapter-scale", "0.7",
               "--style-image", f"{styles / '000.png'}:0.6", "--style-image", str(styles / "001.png"),
               "--output", "ip"],
    }
    procs = {k: subprocess.Popen(argv, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for k, argv in runs.items()}
    out = {k: p.communicate(timeout=600) for k, p in procs.items()}
    for k, p in procs.items():
        assert p.returncode == 0, out[k][1][-3000:]
    assert "ended after 2 frames" in out["cn"][1] and out["cn"][0].startswith("2 frames -> cn.mp4")
    with av.open(str(tmp_path / "cn.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    assert len(decoded) == 2 and all(f.shape == (64, 64, 3) for f in decoded)
    assert len(os.listdir(tmp_path / "ip")) == 2


def run_main(argv, caplog, capsys):
    """main() in this process; (exit status, the error text: the log record or argparse's message)."""
    from rtdiffusion.cli import main

    caplog.clear()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: usage + one error line on stderr
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    return code, (errors[-1] if errors else (err[-1] if err else ""))


RUN = ["run", "--model", "random:tiny", *CPU, "--input", "synthetic", "--output", "o.mp4"]


@pytest.mark.parametrize("extra, message", [
    (["--controlnet", "random:controlnet-tiny:cany:0.5"], "'cany' in 'random:controlnet-tiny:cany:0.5' is not a "
                                                          "preprocessor; expected MODEL[:PREPROCESSOR[:SCALE]]"),
    (["--controlnet", "random:controlnet-tiny:canny:nan"], "must be a number from 0 to 5; got 'nan'"),
    (["--controlnet", ":canny"], "(no model)"),
    (["--controlnet", "random:controlnet-tiny:external"], "takes its control image from --control-video PATH"),
    (["--control-video", "synthetic"], "--control-video feeds ControlNets with the 'external' preprocessor"),
    (["--controlnet", "random:controlnet-tiny:external", "--control-video", "nope.mp4"],
     "--control-video: input 'nope.mp4' does not exist"),
    (["--style-image", "a.png"], "--style-image needs --ip-adapter MODEL"),
    (["--ip-adapter-scale", "0.5"], "--ip-adapter-scale needs --ip-adapter MODEL"),
    (["--ip-adapter-scale", "-1"], "the IP-Adapter scale must be a number from 0 to 5"),
    (["--ip-adapter", "random:ip-adapter-tiny", "--style-image", "missing.png"], "--style-image 'missing.png': no such file"),
    (["--ip-adapter", "random:ip-adapter-tiny", "--style-image", "notes.png"], "is not a readable image"),
    (["--ip-adapter", "random:ip-adapter-tiny", "--style-image", "a.png:0"], "must be a number above 0"),
    (["--controlnet", "random:controlnet-tiny"] * 9, "at most 8 ControlNets"),
    # the cheap model checks come before loading too
    (["--ip-adapter", "random:ip-adapter-tiny"], "--ip-adapter random:ip-adapter-tiny: no IP-Adapter was published "
                                                 "for SD 2.x"),  # random:tiny is SD 2.x
    (["--ip-adapter", "random:ip-adapter-sdxl", "--model", "random:tiny-sd15"], "is for sdxl models"),
    (["--controlnet", "random:controlnet-nope"], "--controlnet random:controlnet-nope: unknown random ControlNet"),
])
def test_bad_control_flags_are_one_line_errors_before_loading(tmp_path, monkeypatch, caplog, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.png").write_text("not a picture")
    code, text = run_main([*RUN, *extra], caplog, capsys)
    assert code == 2 and message in text, text
    assert "\n" not in text and "building random:" not in caplog.text  # one line; nothing loaded


def test_the_preprocessor_names_are_the_engines():
    from rtdiffusion.cli.common import PREPROCESSORS
    from rtdiffusion.control.controlnet import PREPROCESSOR_KINDS

    assert PREPROCESSORS == PREPROCESSOR_KINDS




@pytest.mark.parametrize("argv, message", [
    (["--control-ring", "ctl"], "--control-ring carries the control image of ControlNets with the 'external'"),
    (["--style-ring", "sty"], "--style-ring carries the IP-Adapter's style image; it needs --ip-adapter MODEL"),
    (["--controlnet", "random:controlnet-tiny:external", "--control-ring", "bad/name"], "--control-ring must be 1 to 30"),
])
def test_td_ring_flags(caplog, capsys, argv, message):
    code, text = run_main(["td", "--model", "random:tiny", *CPU, *argv], caplog, capsys)
    assert code == 2 and message in text, text
