"""One vocabulary: the same option has the same name and meaning in every subcommand and in the Python API.

These parse the real parsers (no process, no model), so they are cheap; what a flag does once parsed is
covered by the command tests (tests/test_cli.py, tests/td_bridge, tests/demo).
"""

from __future__ import annotations

import argparse
import logging
import types

import pytest
import torch

from rtdiffusion.cli import build_parser, main
from rtdiffusion.cli.common import ALIASES, OPTIONS, engine_kwargs
from rtdiffusion.config import StreamSettings, apply_updates
from rtdiffusion.errors import ConfigError
from rtdiffusion.vocabulary import cli_spelling, spell, strength_of, t_index_for

ENGINE_COMMANDS = ("run", "bench", "td", "demo", "build")


def subparsers() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def visible(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings
            if s.startswith("--") and s != "--help"}


def test_every_engine_subcommand_is_there():
    assert set(ENGINE_COMMANDS) | {"doctor"} <= set(subparsers())


def test_a_shared_flag_has_one_name_and_meaning_everywhere():
    """For every flag in two or more subcommands: the same dest, type, nargs, and the shared help text
    (a subcommand may only append to it, or differ in default and choices)."""
    seen: dict[str, list[tuple[str, argparse.Action]]] = {}
    for name, parser in subparsers().items():
        for flag, action in visible(parser).items():
            seen.setdefault(flag, []).append((name, action))
    shared = {flag: uses for flag, uses in seen.items() if len(uses) > 1}
    assert {"--strength", "--steps", "--t-index-list", "--width", "--height", "--guidance", "--cfg", "--threads",
            "--device", "--frame-buffer-size", "--model"} <= set(shared)
    for flag, uses in shared.items():
        assert flag in OPTIONS, f"{flag} is in {[n for n, _ in uses]} but not defined once in cli/common.py"
        for name, action in uses:
            where = f"{name} {flag}"
            assert action.dest == flag.lstrip("-").replace("-", "_"), where
            assert action.type is OPTIONS[flag].get("type"), where
            assert action.nargs == OPTIONS[flag].get("nargs"), where
            assert action.help.startswith(OPTIONS[flag]["help"]), where


@pytest.mark.parametrize("command", ENGINE_COMMANDS)
def test_engine_subcommands_share_the_friendly_pair_and_size_rule(command):
    parser = subparsers()[command]
    flags = visible(parser)
    if command != "build":  # build takes a range of steps instead: --min-steps / --max-steps
        for flag in ("--strength", "--steps", "--t-index-list"):
            assert flag in flags, f"{command} lacks {flag}"
    # one default size rule: the model's own size, everywhere (demo included)
    assert flags["--width"].default is None and flags["--height"].default is None, command
    assert "--threads" in flags and "--cfg" in flags
    # --guidance is a number wherever it is shown; the guidance mode is --cfg
    if "--guidance" in flags:
        assert flags["--guidance"].type is float
    assert set(flags["--cfg"].choices) == {"none", "self", "initialize", "full"}
    # --frames is a count of frames to process, or absent (never frames per call)
    if "--frames" in flags:
        assert flags["--frames"].type is int and flags["--frames"].help.startswith("how many frames")


@pytest.mark.parametrize("command", [*ENGINE_COMMANDS, "doctor"])
def test_every_flag_has_help(command):
    parser = subparsers()[command]
    assert parser.description, f"{command} --help has no description"
    for flag, action in visible(parser).items():
        assert action.help and len(action.help) > 10, f"{command} {flag} has no help text"


def test_old_spellings_are_hidden_aliases():
    p = build_parser()
    args = p.parse_args(["run", "--model", "m", "--input", "synthetic", "--output", "o.mp4", "--t-index", "20", "35",
                         "--frame-buffer", "1"])
    assert args.t_index_list == [20, 35] and args.frame_buffer_size == 1
    for name, parser in subparsers().items():
        for alias in ALIASES:
            assert alias not in visible(parser), f"{name} shows the old {alias}"


def test_build_frames_and_guidance_say_where_they_went(capsys, caplog):
    with pytest.raises(SystemExit) as exc:
        main(["build", "--model", "random:tiny", "--frames", "2"])
    assert exc.value.code == 2
    assert "build has no --frames: frames per UNet call is --frame-buffer-size" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING):
        args = build_parser().parse_args(["build", "--model", "m", "--guidance", "none"])
    assert args.cfg == "none" and "use --cfg MODE" in caplog.text


def test_strength_and_steps_mean_the_same_in_the_cli_and_the_api():
    p = build_parser()
    for command, extra in [("run", ["--input", "synthetic", "--output", "o.mp4"]), ("bench", []), ("td", []),
                           ("demo", [])]:
        args = p.parse_args([command, "--model", "m", "--strength", "0.6", "--steps", "3", *extra])
        kw = engine_kwargs(args) if command != "demo" else dict(strength=args.strength, steps=args.steps)
        s = apply_updates(StreamSettings(), 50, strength=kw["strength"], steps=kw["steps"])
        assert list(s.t_index_list) == t_index_for(0.6, 3, 50) == [20, 30, 40], command


def test_the_mapping_round_trips_and_keeps_the_default():
    assert t_index_for(0.35, 1, 50) == [32] == list(StreamSettings().t_index_list)
    for strength in [i / 20 for i in range(21)]:
        for steps in range(1, 17):
            t = t_index_for(strength, steps, 50)
            assert len(t) == steps and t == sorted(set(t)) and 0 <= t[0] and t[-1] < 50
            assert t_index_for(strength_of(t, 50), steps, 50) == t


def test_errors_name_the_flag_in_the_cli_and_the_argument_in_the_api():
    with pytest.raises(ConfigError, match=r"^strength must be a number from 0"):
        apply_updates(StreamSettings(), 50, strength=2.0)
    with cli_spelling():
        with pytest.raises(ConfigError, match=r"^--strength must be a number from 0"):
            apply_updates(StreamSettings(), 50, strength=2.0)
        with pytest.raises(ConfigError, match=r"give either --t-index-list or --strength / --steps"):
            apply_updates(StreamSettings(), 50, strength=0.5, t_index_list=[3])
        assert spell("device", "cpu") == "--device cpu" and spell("guidance_scale") == "--guidance"
    assert spell("device", "cpu") == "device='cpu'" and spell("guidance_scale") == "guidance_scale"


def test_model_and_backend_errors_name_flags_in_the_cli_and_arguments_in_the_api(caplog):
    from rtdiffusion import StreamEngine
    from rtdiffusion.backends import choose_backend
    from rtdiffusion.config import Backend

    with pytest.raises(ConfigError, match=r"^width must be a multiple of 32 pixels for random:sdxl-turbo; got 528"):
        StreamEngine.from_pretrained("random:sdxl-turbo", width=528, height=512, device="cpu")
    assert main(["run", "--model", "random:sdxl-turbo", "--width", "528", "--height", "512", "--device", "cpu",
                 "--input", "synthetic", "--output", "o.mp4"]) == 2
    assert "--width must be a multiple of 32 pixels for random:sdxl-turbo; got 528" in caplog.text
    config = types.SimpleNamespace(backend=Backend.COMPILED, device=torch.device("cuda"), max_vram_gb=2.0)
    with pytest.raises(ConfigError, match=r"max_vram_gb \(low-VRAM weight streaming\) works with backend='eager'"):
        choose_backend(config)
    with cli_spelling(), pytest.raises(ConfigError, match=r"--max-vram-gb \(low-VRAM .* got --backend compiled"):
        choose_backend(config)


@pytest.mark.parametrize("argv, message", [
    (["--width", "0"], "argument --width: must be a multiple of 8 from 8 to 4096 pixels (leave it out for the "
                       "model's own size); got 0"),
    (["--height", "0"], "argument --height: must be a multiple of 8"),
    (["--threads", "0"], "argument --threads: must be 'auto' or from 1 to 1024; got 0"),
])
def test_size_and_threads_are_checked_by_the_parser(capsys, argv, message):
    for command, extra in [("run", ["--input", "synthetic", "--output", "o.mp4"]), ("demo", [])]:
        with pytest.raises(SystemExit):
            main([command, "--model", "random:tiny", *extra, *argv])
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], "--device cuda asked for, but torch sees no CUDA device"),
    (["--strength", "1.5"], "--strength must be a number from 0 (keep the input) to 1 (restyle fully); got 1.5"),
    (["--steps", "17"], "--steps must be an integer from 1 to 16; got 17"),
    (["--dtype", "float16", "--device", "cpu"], "--dtype float16 needs a CUDA device; use --dtype float32"),
    (["--backend", "graph", "--device", "cpu"], "--backend graph needs a CUDA device"),
])
def test_engine_flags_fail_with_flag_names_before_loading(caplog, argv, message):
    import torch

    if torch.cuda.is_available() and "cuda" in " ".join(argv):
        pytest.skip("this machine has a CUDA device")
    for command, extra in [("run", ["--input", "synthetic", "--output", "o.mp4"]), ("bench", []), ("td", [])]:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert main([command, "--model", "random:tiny", *extra, *argv]) == 2, command
        assert message in caplog.text, command
        assert "engine ready" not in caplog.text and "building random:tiny" not in caplog.text


def test_osc_has_the_friendly_pair_too():
    """/strength and /steps reach the engine as update(strength=) / update(steps=), with the ranges the API
    and the CLI use; a bad value is refused at the OSC boundary."""
    import socket

    import numpy as np

    from rtdiffusion import StreamEngine
    from td_bridge.bridge import Bridge, BridgeConfig
    from td_bridge.osc import CONTROLS, OscError, OscSender

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        bridge = Bridge(BridgeConfig(model="random:tiny"))
        bridge.sender = OscSender("127.0.0.1", sink.getsockname()[1])
        bridge.engine = StreamEngine.from_pretrained("random:tiny", device="cpu")
        for address, args in [("/steps", (3,)), ("/strength", (0.6,))]:
            control = CONTROLS[address]
            bridge.mailbox.put(control.key, address, control.parse(args))
        bridge._apply_controls()
        bridge.engine(np.zeros((64, 64, 3), np.uint8))
        assert bridge.engine.status()["t_index_list"] == t_index_for(0.6, 3, 50)
    for address, bad in [("/strength", (1.5,)), ("/strength", ("x",)), ("/steps", (0,)), ("/steps", (17,))]:
        with pytest.raises(OscError):
            CONTROLS[address].parse(bad)
