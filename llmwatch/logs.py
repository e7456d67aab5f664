"""Log set-up for the command line: plain text or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from llmwatch.config import LOG_FORMATS

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# These loggers write a line per HTTP request at INFO, which would double
# llmwatch's own line per call.
CHATTY_LOGGERS = ("httpx", "httpx2", "openai", "aiohttp.access")


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object, for log collectors in containers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Send every log record at ``level`` or above to stderr."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {LOG_FORMATS}")
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if level != "DEBUG":
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
