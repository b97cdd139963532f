"""llm-router: an OpenAI-compatible gateway that switches single-model engines on demand."""

__version__ = "0.1.0"
