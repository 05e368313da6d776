"""powerlow: run language models bigger than the memory you give them (PowerInfer-2-style neuron-cluster offloading)."""
__version__ = "0.1.0"

from .errors import PowerlowError  # noqa: E402
from .config import RuntimeConfig  # noqa: E402


def load(path=None, config=None, **kw):
    """Load a model dir (None = the default SmolLM2-135M-Instruct). See powerlow.model.Model."""
    from .model import load as _load
    return _load(path, config, **kw)


__all__ = ["load", "PowerlowError", "RuntimeConfig", "__version__"]
