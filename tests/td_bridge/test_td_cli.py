"""`rtdiffusion td` flags are checked before anything loads; errors name what was expected."""

import pytest


@pytest.mark.parametrize("argv, message", [
    (["--input-name", "bad/name"], "--input-name must be 1 to 30 letters"),
    (["--osc-out-port", "0"], "--osc-out-port must be a port number from 1 to 65535"),
    (["--slots", "40"], "slots must be an integer from 1 to 16"),
])
def test_bad_cli_flags_fail_before_loading_with_a_clear_message(argv, message, caplog):
    from rtdiffusion.cli import main

    assert main(["td", "--model", "random:tiny", *argv]) == 2
    assert message in caplog.text
