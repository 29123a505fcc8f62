"""Watching what a step does between the host and a device, on a CPU-only build.

The meta device stands in for CUDA: like CUDA it is not the CPU (so every code path that
asks "is this the CPU?" takes its device branch), its kernels run every op of the network
forward and backward (shapes only, no data), and its tensors cannot be read on the host.
``DeviceAudit`` is a dispatch mode that sees every op on the way down and records:

- ``mixed``: an op that takes a host tensor (other than a 0-dim one read as a number) beside
  device tensors, or writes into a host tensor from the device: on CUDA an error or a
  device-to-host copy, every step;
- ``uploads``: a copy from the host to the device of anything but the tensors allowed (the
  batch), and every ``torch.tensor(x, device=...)`` / ``torch.as_tensor`` onto the device
  (made on the host and copied up below the dispatcher, so they are watched at the Python
  call): on CUDA each waits for the copy;
- ``syncs``: a read of a device value on the host (``.item()``, ``bool()``, ``.tolist()``),
  which on CUDA waits for the device to catch up. Answered with 0 here.
"""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
META = torch.device("meta")


class DeviceAudit(TorchDispatchMode):
    def __init__(self, allowed_uploads: int = 0) -> None:
        super().__init__()
        self.mixed: list[str] = []
        self.uploads: list[str] = []
        self.syncs: list[str] = []
        self.allowed_uploads = allowed_uploads  # the first n host-to-device copies (the batch)
        self._made = {}

    def __enter__(self):
        for name in ("tensor", "as_tensor"):
            made = self._made[name] = getattr(torch, name)
            setattr(torch, name, self._watch(made, name))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, made in self._made.items():
            setattr(torch, name, made)
        return super().__exit__(*exc)

    def _watch(self, made, name: str):
        def watched(data, *args, **kwargs):
            device = kwargs.get("device")
            if device is not None and torch.device(device).type != "cpu":
                self.uploads.append(f"torch.{name}(<{type(data).__name__}>, device={device})")
            return made(data, *args, **kwargs)

        return watched

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func is aten._local_scalar_dense.default:
            self.syncs.append(f"{func} of a {tuple(tensors[0].shape)} tensor")
            return False if tensors[0].dtype == torch.bool else 0
        host = [t for t in tensors if t.device.type == "cpu"]
        device = [t for t in tensors if t.device.type != "cpu"]
        name = str(func)
        op = func.overloadpacket.__name__  # add_ for aten.add_.Tensor
        if func is aten._to_copy.default and host and kwargs.get("device") not in (None,):
            if torch.device(kwargs["device"]).type != "cpu":
                if self.allowed_uploads > 0:
                    self.allowed_uploads -= 1
                else:
                    self.uploads.append(f"{name} of {tuple(host[0].shape)} {host[0].dtype}")
        elif host and device:
            into_host = op.endswith("_") and tensors[0].device.type == "cpu"
            if into_host or any(t.dim() > 0 for t in host):
                self.mixed.append(f"{name}: {[(tuple(t.shape), str(t.device)) for t in tensors]}")
        return func(*args, **kwargs)
