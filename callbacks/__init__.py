"""Lightning callbacks: validation-time generation metrics, media logging and sample export."""
from callbacks.generation import GenerationMetrics

__all__ = ["GenerationMetrics"]
