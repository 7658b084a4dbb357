"""User-facing exceptions. Each message names the problem and the fix; the CLI prints it without a traceback."""


class JinbetweenError(Exception):
    """Base class of every error a user can act on."""


class ConfigError(JinbetweenError, ValueError):
    """A model config has an unsupported value or an unknown field."""


class InputShapeError(JinbetweenError, ValueError):
    """An array handed to a model has the wrong shape."""


class WeightsNotFoundError(JinbetweenError, FileNotFoundError):
    """A weights folder or file is missing or is not in a format we read."""


class PickleRefusedError(JinbetweenError):
    """Only pickled (.bin/.pt) weights were found and pickle loading was not allowed."""


class CorruptWeightsError(JinbetweenError):
    """A weights file cannot be parsed (truncated download, wrong format)."""


class KeyMismatchError(JinbetweenError):
    """Source tensors and model parameters do not correspond one to one."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str]):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected


class ShapeMismatchError(JinbetweenError):
    """A source tensor has a shape that the model config does not expect."""

    def __init__(self, message: str, mismatches: list[tuple[str, tuple, tuple]]):
        super().__init__(message)
        self.mismatches = mismatches


class ImageError(JinbetweenError):
    """A keyframe file is missing, unreadable or not an image."""


class DeltaMismatchError(JinbetweenError):
    """A fine-tuned model differs from its stated base outside the tensors a weight delta may change."""

    def __init__(self, message: str, differences: list[tuple[str, float]]):
        super().__init__(message)
        self.differences = differences


class DataError(JinbetweenError):
    """Training videos are missing, unreadable, too short for the requested clips, or changed since the scan."""


class ArgumentError(ConfigError):
    """An argument is of the wrong type or out of range, or names an output that cannot be written."""


class NonFiniteError(JinbetweenError):
    """Weights or a generated result hold NaN or Inf."""


class NonFiniteWeightsError(NonFiniteError, CorruptWeightsError):
    """A model's weights hold NaN or Inf; `tensors` names them."""

    def __init__(self, message: str, tensors: list[str]):
        super().__init__(message)
        self.tensors = tensors


class DivergedError(NonFiniteError):
    """Sampling or decoding produced NaN or Inf from finite weights; `move` is the first sampler move whose output
    was non-finite (1-based; 0: before the first move; None: the latents were finite, the decoded frames not)."""

    def __init__(self, message: str, move: int | None):
        super().__init__(message)
        self.move = move


class IntegrityError(CorruptWeightsError):
    """Weight files differ from the sha256 hashes recorded for them, or are missing; `files` names them."""

    def __init__(self, message: str, files: list[str]):
        super().__init__(message)
        self.files = files
