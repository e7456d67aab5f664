"""llmwatch: cost, latency and error metrics for OpenAI calls."""

__version__ = "0.1.0"
