"""The entry points' log set-up prints INFO records even when a dependency has already installed a WARNING-level
root handler, as absl does on importing orbax (which silenced the training's JSON records)."""

import subprocess
import sys

PROGRAM = """
import logging, sys
logging.getLogger().addHandler(logging.StreamHandler(sys.stderr))  # what absl's import does
logging.getLogger().setLevel(logging.WARNING)
{configure}
logging.getLogger("jinbetween.somewhere").info("the marker record")
logging.getLogger("absl").info("orbax chatter")
"""


def stderr_of(configure: str) -> str:
    return subprocess.run([sys.executable, "-c", PROGRAM.format(configure=configure)], capture_output=True, text=True,
                          check=True).stderr


def test_configure_prints_info_records_despite_an_earlier_root_handler():
    assert stderr_of("from jinbetween import logs; logs.configure()").splitlines() == ["the marker record"]


def test_a_plain_basic_config_is_silenced_by_it():  # negative control: the situation the set-up has to handle
    assert "the marker record" not in stderr_of('logging.basicConfig(level=logging.INFO, format="%(message)s")')


def test_importing_the_training_module_leaves_info_records_to_the_set_up():
    program = ("import logging, jinbetween.toyworld.train as t; from jinbetween import logs; logs.configure(); "
               "t.log.info('the marker record')")
    stderr = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stderr
    assert "the marker record" in stderr.splitlines()
