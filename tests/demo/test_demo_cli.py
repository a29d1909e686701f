"""`rtdiffusion demo` flags are checked before anything heavy loads; a busy port is named."""

from __future__ import annotations

import logging
import socket

import pytest

from rtdiffusion.cli import main

BASE = ["demo", "--model", "random:tiny", "--width", "64", "--height", "64", "--device", "cpu", "--dtype", "float32"]


@pytest.mark.parametrize("extra, words", [
    (["--port", "70000"], "--port must be from 0 to 65535"),
    (["--strength", "1.5"], "--strength must be a number from 0 (keep the input) to 1"),
    (["--steps", "5"], "--steps must be from 1 to --max-steps (4)"),
    (["--min-frame-ms", "-5"], "--min-frame-ms must be from 0 to 60000"),
    (["--jpeg-quality", "0"], "jpeg quality must be an integer from 1 to 100"),
    (["--allow-host", "http://studio.local"], "an allowed host is a bare name or address"),
    (["--token", "short"], "the token must be 8 to 200 characters"),
    (["--style-image", "look.png"], "--style-image needs --ip-adapter MODEL"),
    (["--ip-adapter", "random:ip-adapter-tiny"], "no IP-Adapter was published for SD 2.x models"),
])
def test_bad_flags_exit_2_with_a_clear_message(caplog, extra, words):
    with caplog.at_level(logging.ERROR):
        assert main(BASE + extra) == 2
    assert words in caplog.text


def test_a_busy_port_is_named(caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with caplog.at_level(logging.ERROR):
            assert main(BASE + ["--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text and "--port 0" in caplog.text


def test_a_bad_controlnet_flag_names_what_was_expected(capsys):
    with pytest.raises(SystemExit) as info:
        main(BASE + ["--controlnet", "random:controlnet-tiny:canny:9"])
    assert info.value.code == 2
    assert "--controlnet: the scale in 'random:controlnet-tiny:canny:9' must be a number from 0 to 5" in \
        capsys.readouterr().err
