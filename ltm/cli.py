"""The command-line options every run-starting command shares (`ltm.train`, the studies), declared once, and how
every command sets up its messages (-v/-q: `add_verbosity`, `configure_logging`)."""

from __future__ import annotations

import argparse
import logging
import sys


def add_run_options(parser: argparse.ArgumentParser, *, experiment_default: str | None,
                    experiment_shown: str | None = None, every_point: bool = False) -> None:
    """--data, --set, --tracking-uri, --experiment and --runs-dir on `parser`. `experiment_default` is
    --experiment's default (None: the command picks it, shown in --help as `experiment_shown`); with
    `every_point` the help says that --data and --set apply to every point of a study."""
    scope = " for every point" if every_point else ""
    parser.add_argument("--data", help=f"data.name{scope}: 'synthetic', a hub name (e.g. openwebtext), a local path or "
                        "data:NAME, the file or folder NAME of $LTM_DATA_DIR (ltm.data.paths)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value by its dotted key{scope}, e.g. inference.steps=32, "
                             "model.n_latents=8, train.tokens=1e6, seed=1 (repeatable)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<runs-dir>/mlflow.db)")
    parser.add_argument("--experiment", default=experiment_default,
                        help=f"MLflow experiment name (default {experiment_shown or experiment_default})")
    parser.add_argument("--runs-dir", default="runs",
                        help="folder for checkpoints, the default MLflow store and artifacts (and a study's Ray and "
                             "SLURM folders) (default runs)")


# -- messages --------------------------------------------------------------------------------------

LOGGERS = ("ltm", "studies", "analysis", "py.warnings")
"""The loggers a command configures: the library's (every module logs to `logging.getLogger(__name__)`, or to its
dotted name when it also runs as a command, where __name__ is "__main__") and Python's warnings
(`logging.captureWarnings`)."""


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """-v/--verbose and -q/--quiet (both counting) on `parser`; `log_level` reads them."""
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more messages on stderr: -v adds debug messages")
    parser.add_argument("-q", "--quiet", action="count", default=0,
                        help="fewer messages on stderr: -q only warnings and errors, -qq only errors; the final "
                             "summary still prints on stdout")


def log_level(args: argparse.Namespace) -> int:
    """The logging level -v/-q ask for: INFO by default, DEBUG with -v, WARNING with -q, ERROR with -qq."""
    return min(max(logging.INFO + 10 * (args.quiet - args.verbose), logging.DEBUG), logging.ERROR)


class _Stderr(logging.StreamHandler):
    """A handler that writes to the sys.stderr of the moment (a worker redirects it for each point), above
    any progress bar drawn there (tqdm.write), which a message would otherwise break in two."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it: always sys.stderr here
        pass

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


class _Formatter(logging.Formatter):
    """An INFO message as it is; any other level prefixed with it, e.g. `warning: ...`."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno == logging.INFO else f"{record.levelname.lower()}: {text}"


_HANDLER = _Stderr()
_HANDLER.setFormatter(_Formatter("%(message)s"))


def configure_logging(level: int = logging.INFO) -> None:
    """What a command (or a study's worker process) does once: the library's messages and Python's warnings
    at `level` and above go to stderr. Calling it again only changes the level. The library itself never
    configures logging: a program that imports `ltm` decides where its messages go."""
    logging.captureWarnings(True)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if _HANDLER not in logger.handlers:
            logger.addHandler(_HANDLER)


UNVERIFIED_RISK = ("a file changed since it was written (corrupt, truncated or tampered) then gives wrong numbers "
                   "without any other sign")
"""What reading a checkpoint without checking its sha256 risks: said by --no-verify's help and its warnings."""


def add_verify_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, reads: str) -> None:
    """--no-verify, for every command that reads checkpoints given on its command line (`reads` says what it
    does with them)."""
    parser.add_argument("--no-verify", action="store_true",
                        help=f"{reads} checkpoints whose sha256 does not match their .sha256 file, with a warning: "
                             f"{UNVERIFIED_RISK}")
