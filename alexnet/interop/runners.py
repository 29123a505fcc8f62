"""The runners behind ``--backend`` (``alexnet.interop.engines``): each one callable on an
input batch, returning float32 logits (or a layer's activations) on the input's device."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from torch import nn


def torch_fn(net: nn.Module, layer: str | None):
    """``net``'s logits, or with ``layer`` its flattened activations there."""
    if layer is None:
        return net
    return lambda x: net.forward_features(x, layer).flatten(1)


class TorchRunner:
    def __init__(self, model: nn.Module, precision: str, channels_last: bool, layer: str | None):
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        if self.dtype == torch.float32:
            net = model.to(memory_format=self.fmt)
        else:
            # a bf16 copy of the weights, not autocast, which recasts them on every call;
            # assigned, not converted in place (so fake CUDA tensors can stand in, in tests)
            net = copy.deepcopy(model)
            net.load_state_dict(
                {k: self._cast(v) for k, v in model.state_dict().items()}, assign=True
            )
        self.fn = torch_fn(net, layer)

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        """A weight as ``Module.to(dtype, memory_format=...)`` would make it."""
        if not t.is_floating_point():
            return t
        return t.to(self.dtype, memory_format=self.fmt if t.dim() == 4 else torch.preserve_format)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x.to(self.dtype).contiguous(memory_format=self.fmt)).float()


class OnnxRuntimeRunner:
    """``spin=False`` (our commands): ONNX Runtime's threads sleep after a run instead of
    spinning for tens of ms and taking the cores from the loading between batches (ten-view
    evaluate of the demo's model: 18.3-18.4 s spinning, 16.9-17.4 s not). ``spin=True``: its
    default, as a user running it alone would (the bench's peer)."""

    def __init__(self, graph: Path, threads: int, spin: bool = False) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()
        return torch.from_numpy(self.session.run(None, {self.name: x.numpy()})[0])


@functools.cache
def openvino_core():
    """The process's one OpenVINO ``Core``, kept until the process ends.

    Each ``Core`` loads its own CPU plugin, and the plugin swaps the calling thread's signal
    stack (``sigaltstack``) for one it maps, restoring the previous one when it is destroyed
    only if its own is still current. Two cores destroyed in the order they were made leave
    the thread's signal stack pointing at unmapped memory, and the next signal handled there
    (Python installs its handlers with SA_ONSTACK: a child's SIGCHLD under a DataLoader, a
    SIGTERM) kills the process with SIGSEGV. One core, never destroyed early, cannot.
    ``tests/test_engines.py`` shows the crash with two cores and none through this one.
    """
    import openvino

    return openvino.Core()


class OpenVinoRunner:
    def __init__(self, graph: Path, precision: str, threads: int, cache: Path) -> None:
        self.compiled = openvino_core().compile_model(
            str(graph),
            "CPU",
            {
                "CACHE_DIR": str(cache),  # the compiled model, reused next run
                "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                "INFERENCE_NUM_THREADS": threads,
                "PERFORMANCE_HINT": "LATENCY",  # one request at a time, all threads on it
            },
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()
        return torch.from_numpy(self.compiled(x.numpy())[0].copy())
