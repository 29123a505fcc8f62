"""AlexNet as in Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep
Convolutional Neural Networks" (NeurIPS 2012). See docs/ARCHITECTURE.md for where each
section of the paper lives.

    from alexnet import AlexNet, Predictor, load_pretrained

    model = AlexNet()                                   # the paper's network, untrained
    p = Predictor.load("IMAGENET1K_V1")                 # any trained network, ready to use
    p.predict(["cat.jpg"])                              # its top 5 for each image
    net = load_pretrained("bvlc_alexnet")               # the nn.Module, with .transforms
"""

__version__ = "0.2.0"

from alexnet.inference import Predictor  # noqa: E402
from alexnet.interop.weights import load_pretrained  # noqa: E402
from alexnet.model import AlexNet  # noqa: E402

__all__ = ["AlexNet", "Predictor", "__version__", "load_pretrained"]
