"""The HTTP service (``lens serve``): a JSON API over the pipeline and the agent, and optionally the web app."""

from lens.serve.app import ServeSettings, create_app, serve_in_thread
from lens.serve.queue import QueueFull, SegmentQueue

__all__ = ["QueueFull", "SegmentQueue", "ServeSettings", "create_app", "serve_in_thread"]
