"""AlexNet as in Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep
Convolutional Neural Networks" (NeurIPS 2012). See docs/ARCHITECTURE.md for where each
section of the paper lives."""

__version__ = "0.1.0"

from alexnet.model import AlexNet  # noqa: E402


def _from_pretrained(cls, name: str, *, map_location="cpu", progress: bool = True) -> AlexNet:
    """Published weights by name (``"IMAGENET1K_V1"``: torchvision's, the owt layout;
    ``"bvlc_alexnet"``: Caffe's, the paper's layout; docs/EVALUATION.md), downloaded once,
    verified, converted once and cached. In eval mode, with ``.transforms`` (RGB tensors in,
    this weight set's own inputs out) and ``.meta`` (class ids and names, source)."""
    from alexnet.interop.weights import load_pretrained

    return load_pretrained(name, map_location=map_location, progress=progress)


# ``AlexNet.from_pretrained`` is bound here rather than in model.py: the weights code builds
# models, so the network's module stays below it and imports nothing of interop.
AlexNet.from_pretrained = classmethod(_from_pretrained)

__all__ = ["AlexNet", "__version__"]
