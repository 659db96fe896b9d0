"""`prism serve`: an OpenAI-compatible server with batched speculative decoding."""

from .app import create_app, serve_in_thread
from .engine import BatchingEngine, EngineRequest

__all__ = ["BatchingEngine", "EngineRequest", "create_app", "serve_in_thread"]
