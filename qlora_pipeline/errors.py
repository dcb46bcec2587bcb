"""The exceptions users see as one line rather than a traceback, and the helpers that make a line of a message."""


class PipelineError(Exception):
    """Bad input found before or during a run: the CLI prints it as one line and exits non-zero.

    The message must name what is wrong and where (file, line, key) and what is allowed.
    """

    exit_code = 2


class RecipeError(PipelineError):
    """A recipe that cannot run: unknown key, wrong type, missing field, impossible combination."""


class DataError(PipelineError):
    """Data that cannot be trained on: missing file, malformed row, missing column, empty dataset."""


class PublishError(PipelineError):
    """The Hub could not be reached or refused the upload (offline, token, permissions, quota): the export is
    untouched and the same command publishes it again."""

    exit_code = 3


class Interrupted(PipelineError):
    """Training stopped by SIGINT or SIGTERM after saving a checkpoint; `train RECIPE --resume` continues it.

    Exits as a shell reports a process ended by that signal: 128 + its number (130 for SIGINT, 143 for SIGTERM)."""

    exit_code = 130

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none): what a one-line error quotes."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def clip(text: str, limit: int = 200) -> str:
    """`text` cut to at most `limit` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def one_line(text: str, limit: int = 200) -> str:
    """`text` on one line (runs of whitespace made one space), clipped to `limit` characters."""
    return clip(" ".join(str(text).split()), limit)
