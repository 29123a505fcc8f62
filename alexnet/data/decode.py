"""Decoding the stored JPEG records: the fastest installed CPU decoder, PIL as the fallback,
and nvJPEG on a CUDA device where torchvision with CUDA is installed.

CPU decoders, tried in ``ORDER`` (fastest first, measured with ``alexnet bench-loader
--decoders``; figures in docs/DATA.md):

- ``simplejpeg``: a wheel with libjpeg-turbo built in; decodes straight into the batch
  buffer.
- ``turbojpeg``: PyTurboJPEG, ctypes over the system's libturbojpeg (Debian
  ``libturbojpeg0``); as fast within the noise, but it needs the system library and its
  1.x releases only warn about a truncated file (checked here instead).
- ``pil``: Pillow (its wheels use libjpeg-turbo too; pillow-simd, measured, decodes no
  faster), always there: the fallback.

All three run libjpeg-turbo's accurate integer IDCT, so they give the same pixels
(``tests/test_decode.py`` checks against PIL). ``ALEXNET_JPEG_DECODER=pil`` (or
``turbojpeg``, ``simplejpeg``) forces one; it is read at each call, so it reaches DataLoader
workers whether they fork or spawn. Forcing one that is not installed is an error, never a
silent fallback.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from functools import cache

import numpy as np
import torch

from alexnet.runtime.errors import UserError

ORDER = ("simplejpeg", "turbojpeg", "pil")
ENV = "ALEXNET_JPEG_DECODER"
Decoder = Callable[[bytes | memoryview | np.ndarray, np.ndarray], None]


def _check(shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """Records are (H, W, C); a record of another size or colour space is an error."""
    if tuple(shape) != tuple(expected):
        raise ValueError(f"stored record is {tuple(shape)}, expected {tuple(expected)}")


def _pil_into(data, out: np.ndarray) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()  # PIL releases the GIL while decoding
        arr = np.asarray(img)
    _check(arr.shape if arr.ndim == 3 else (*arr.shape, 1), out.shape)
    out[...] = arr.reshape(out.shape)


# Channels of a JPEG's colour space; PIL decodes Gray as 1, CMYK and YCCK as 4 channels.
_CHANNELS = {"Gray": 1, "CMYK": 4, "YCCK": 4}


def _simplejpeg() -> Decoder:
    import simplejpeg

    def into(data, out: np.ndarray) -> None:
        # The header first (4 us): simplejpeg would turn a grey record into RGB, or write a
        # smaller image into the start of ``out``, where PIL's shape differs.
        h, w, space, _ = simplejpeg.decode_jpeg_header(data)
        _check((h, w, _CHANNELS.get(space, 3)), out.shape)
        space = "GRAY" if out.shape[2] == 1 else "RGB"
        simplejpeg.decode_jpeg(data, colorspace=space, buffer=out)

    return into


def _turbojpeg() -> Decoder:
    import turbojpeg

    tj = turbojpeg.TurboJPEG()  # RuntimeError without libturbojpeg
    spaces = {turbojpeg.TJCS_GRAY: "Gray", turbojpeg.TJCS_CMYK: "CMYK", turbojpeg.TJCS_YCCK: "YCCK"}

    def into(data, out: np.ndarray) -> None:
        # libjpeg only warns about a truncated file (and fills the rest with grey); PIL and
        # simplejpeg raise, and so does this. PyTurboJPEG 1.x turns even STOPONWARNING into
        # a warning, so check for the end-of-image marker that every record ends with.
        if bytes(data[-2:]) != b"\xff\xd9":
            raise ValueError("JPEG record is truncated (no end-of-image marker)")
        w, h, _, space = tj.decode_header(data)
        _check((h, w, _CHANNELS.get(spaces.get(space, ""), 3)), out.shape)
        fmt = turbojpeg.TJPF_GRAY if out.shape[2] == 1 else turbojpeg.TJPF_RGB
        tj.decode(data, pixel_format=fmt, dst=out)

    return into


_MAKERS: dict[str, Callable[[], Decoder]] = {
    "simplejpeg": _simplejpeg,
    "turbojpeg": _turbojpeg,
    "pil": lambda: _pil_into,
}


@cache
def _load(name: str) -> Decoder | None:
    """The decoder, or None where its package (or library) is missing. Once per process."""
    try:
        return _MAKERS[name]()
    except (ImportError, OSError, RuntimeError):
        return None


def available() -> list[str]:
    """The installed CPU decoders, fastest first."""
    return [n for n in ORDER if _load(n) is not None]


def choose(name: str | None = None) -> str:
    """``name``, else ``$ALEXNET_JPEG_DECODER``, else the first installed of ``ORDER``."""
    forced = name or os.environ.get(ENV) or None
    if forced is None:
        return next(n for n in ORDER if _load(n) is not None)  # "pil" always loads
    if forced not in _MAKERS:
        raise UserError(f"JPEG decoder {forced!r}: unknown; choose from {', '.join(ORDER)}")
    if _load(forced) is None:
        raise UserError(
            f"JPEG decoder {forced!r} is not installed (installed: {', '.join(available())})"
        )
    return forced


def decode_into(data, out: np.ndarray, name: str | None = None) -> None:
    """Decode one JPEG record into ``out`` (H, W, C) uint8, C-contiguous; ValueError if the
    record's size differs from ``out``'s."""
    _load(choose(name))(data, out)


def nvjpeg_unavailable(device: torch.device | str) -> str | None:
    """Why nvJPEG cannot decode on ``device`` (None: it can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        import torchvision.io  # noqa: F401
    except Exception as e:  # a torchvision built for another torch fails in many ways
        return f"torchvision is not importable ({type(e).__name__}: {e})"
    return None


class DeviceDecoder:
    """``dec(records) -> uint8 (B, C, H, W)`` on ``device``, from a list of JPEG records.

    With nvJPEG (``backend == "nvjpeg"``) the bytes go to the GPU and are decoded there as one
    batch (``torchvision.io.decode_jpeg(..., device="cuda")``). Otherwise (``reason`` says
    why) the records are decoded on the CPU by ``choose(cpu)`` and the batch is copied over.
    """

    def __init__(self, device, shape: tuple[int, int, int], *, cpu: str | None = None) -> None:
        self.device, self.shape = torch.device(device), tuple(shape)
        self.reason = nvjpeg_unavailable(self.device)
        self.backend = "nvjpeg" if self.reason is None else choose(cpu)

    def __call__(self, records: Sequence) -> torch.Tensor:
        h, w, c = self.shape
        if self.backend == "nvjpeg":
            from torchvision.io import ImageReadMode, decode_jpeg

            mode = ImageReadMode.GRAY if c == 1 else ImageReadMode.RGB
            data = [torch.frombuffer(bytearray(r), dtype=torch.uint8) for r in records]
            images = decode_jpeg(data, mode=mode, device=self.device)
            for img in images:
                if tuple(img.shape) != (c, h, w):
                    _check((*img.shape[1:], img.shape[0]), self.shape)
            return torch.stack(images)
        buf = torch.empty((len(records), h, w, c), dtype=torch.uint8)
        out = buf.numpy()
        for k, r in enumerate(records):
            decode_into(r, out[k], self.backend)
        pin = self.device.type == "cuda"
        return (buf.pin_memory() if pin else buf).permute(0, 3, 1, 2).to(self.device)
