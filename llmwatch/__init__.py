"""llmwatch: cost, latency and error metrics for OpenAI calls.

The library API of push mode is ``BatchSession``; see docs/push-mode.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from llmwatch.calls import AskResult
    from llmwatch.errors import ApiError, ConfigError, LlmwatchError
    from llmwatch.pricing import Usage
    from llmwatch.session import BatchSession

__all__ = [
    "ApiError",
    "AskResult",
    "BatchSession",
    "ConfigError",
    "LlmwatchError",
    "Usage",
    "__version__",
]

# Imported on first use, so that the command line starts without loading the
# OpenAI client.
_EXPORTS = {
    "ApiError": "llmwatch.errors",
    "AskResult": "llmwatch.calls",
    "BatchSession": "llmwatch.session",
    "ConfigError": "llmwatch.errors",
    "LlmwatchError": "llmwatch.errors",
    "Usage": "llmwatch.pricing",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llmwatch' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
