"""`prism serve`: an OpenAI-compatible server with batched speculative decoding."""

from .app import create_app
from .engine import BatchingEngine, EngineRequest

__all__ = ["BatchingEngine", "EngineRequest", "create_app"]
