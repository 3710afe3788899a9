"""weightpack's producer side: compression methods, entropy coding, writing packed files."""

__version__ = "0.1.0"
