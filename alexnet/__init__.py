"""AlexNet as in Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep
Convolutional Neural Networks" (NeurIPS 2012). See docs/ARCHITECTURE.md for where each
section of the paper lives."""

__version__ = "0.1.0"

from alexnet.model import AlexNet  # noqa: E402

__all__ = ["AlexNet", "__version__"]
