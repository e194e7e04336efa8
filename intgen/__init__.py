"""intgen: build intervention (InT) datasets for LLM math reasoning."""

__version__ = "0.1.0"
