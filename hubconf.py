"""torch.hub entry points, as torchvision and other model repositories have them:

    model = torch.hub.load("<owner>/<repo>", "alexnet", weights="IMAGENET1K_V1")
    model = torch.hub.load("path/to/clone", "alexnet", source="local", weights="bvlc_alexnet")

Weight names, their layouts, preprocessing and published accuracy: docs/WEIGHTS.md.
"""

dependencies = ["torch", "numpy", "PIL", "google.protobuf"]


def alexnet(weights=None, progress=True, **kwargs):
    """The paper's network (``AlexNet(**kwargs)``, untrained), or with ``weights`` a published
    weight set by name in the layout it was trained in, in eval mode, with ``.transforms``
    (RGB tensors in, its own preprocessing applied) and ``.meta`` (class ids and names)."""
    from alexnet import AlexNet, load_pretrained

    if weights is None:
        return AlexNet(**kwargs)
    if kwargs:
        raise ValueError(f"weights={weights!r} fixes the model; unexpected {sorted(kwargs)}")
    name = getattr(weights, "name", weights)  # a torchvision-style enum member, or its name
    return load_pretrained(str(name), progress=progress)
