"""Log output of the command-line entry points."""

import logging


def configure(level: int = logging.INFO) -> None:
    """Sends log records of `level` and above to stderr as bare messages; absl's (orbax's chatter) from WARNING.

    `force`: importing orbax makes absl install a root handler at WARNING, which would otherwise turn a plain
    `logging.basicConfig` into a no-op and silence every INFO line (the training's JSON records included).
    """
    logging.basicConfig(level=level, format="%(message)s", force=True)
    logging.getLogger("absl").setLevel(max(level, logging.WARNING))
