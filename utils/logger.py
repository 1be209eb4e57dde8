"""Logging: a colour console handler on rank 0, a plain log file per rank (log_rank<r>.txt, appended)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from termcolor import colored

__all__ = ["LOGGER_NAME", "setup_console_logging", "add_file_logging", "log_to_files"]

# Parent of every logger in the project (data warnings use "defmamba.data").
LOGGER_NAME = "defmamba"
_FORMAT = "[%(asctime)s %(name)s] (%(filename)s %(lineno)d) %(levelname)s: %(message)s"
_DATE = "%Y-%m-%d %H:%M:%S"


class _ColorFormatter(logging.Formatter):
    """Green time stamp and name, red level for warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        head = colored(f"[{self.formatTime(record, _DATE)} {record.name}]", "green")
        where = colored(f"({record.filename} {record.lineno})", "yellow")
        level = colored(record.levelname, "red") if record.levelno >= logging.WARNING else record.levelname
        return f"{head} {where} {level}: {record.getMessage()}"


def setup_console_logging(rank: int) -> logging.Logger:
    """The project logger with a stdout handler on rank 0 only (other ranks log to their file)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(_ColorFormatter())
        logger.addHandler(console)
    return logger


def add_file_logging(logger: logging.Logger, output_dir: Path, rank: int) -> Path:
    """Append this rank's records to output_dir/log_rank<rank>.txt; returns the file path."""
    path = output_dir / f"log_rank{rank}.txt"
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt=_DATE))
    logger.addHandler(handler)
    return path


def log_to_files(logger: logging.Logger, level: int, message: str) -> None:
    """Write `message` to the log files only (for text already shown on the console another way)."""
    record = logger.makeRecord(logger.name, level, __file__, 0, message, None, None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
