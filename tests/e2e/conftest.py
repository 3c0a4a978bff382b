"""The end-to-end tests' way to run the `mmfusion` command: a subprocess in its own session, hard timeout."""

import pytest

from clirun import run_mmfusion


@pytest.fixture(scope="session")
def mmfusion():
    return run_mmfusion
