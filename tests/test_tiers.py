"""The fast tier (-m "not slow") starts no process: conftest.py refuses subprocess.Popen to a
test not marked slow, during its fixtures' set-up and teardown too."""
import subprocess
import sys

import pytest


def test_a_test_not_marked_slow_cannot_start_a_process():
    with pytest.raises(pytest.fail.Exception, match="is not marked slow: mark it @pytest.mark.slow"):
        subprocess.run([sys.executable, "-c", "pass"])


@pytest.fixture
def starts_a_process():
    return subprocess.run([sys.executable, "-c", "print('started')"], capture_output=True, text=True)


@pytest.mark.slow
def test_a_slow_test_and_its_fixtures_may(starts_a_process):
    assert starts_a_process.stdout == "started\n"
