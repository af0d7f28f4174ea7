"""Continuous batching over the ONNX runtime (torch-free): `Engine`, request handles."""

from pgexport.engine.engine import Engine, EngineStats
from pgexport.engine.request import Chunk, PromptTooLong, QueueFull, Request, Result

__all__ = ["Engine", "EngineStats", "Chunk", "PromptTooLong", "QueueFull", "Request", "Result"]
