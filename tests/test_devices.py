"""The CUDA path's device logic, checked on a CPU-only build with fake tensors.

Under ``FakeTensorMode`` a tensor made with ``device="cuda"`` is a fake cuda:0 tensor that
carries shapes and devices but no data, and an op that mixes it with a CPU tensor raises
``FakeTensorDeviceMismatchError``, as CUDA itself would. The session is built by the real
``build`` on fake cuda:0, then the bookkeeping around a training step, the validation
counting, the test views, the all-reduce payloads and the restore of a checkpoint run on it.
What fake tensors cannot reach (a CUDA generator needs the CUDA library; a conv backward)
is listed in docs/SPEED.md, "The CUDA lines no CPU test reaches".
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from devicekit import META, DeviceAudit
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from trainkit import tiny_config, tiny_data

from alexnet import checkpoint as ckpt_io
from alexnet import model as M
from alexnet import session as S
from alexnet import train as T
from alexnet.evaluate import Counts
from alexnet.runtime import devices
from alexnet.runtime.distributed import DistEnv

CUDA = torch.device("cuda", 0)


@pytest.fixture
def fake_cuda_session(tmp_path: Path, monkeypatch):
    """``build`` on fake cuda:0. Two things are made real on the CPU instead: the
    augmentation's generator (a CUDA generator needs the CUDA library), after checking that
    the build asked for one on the session's device; and the network's initial weights
    (fake mode cannot move parameters it made itself), which ``build`` then places."""
    asked = []

    def generator(device, seed):
        asked.append(torch.device(device))
        return torch.Generator().manual_seed(seed)

    def real_weights(*args, **kwargs):
        with unset_fake_temporarily():
            return alexnet_model(*args, **kwargs)

    alexnet_model = M.AlexNet
    monkeypatch.setattr(devices, "generator", generator)
    monkeypatch.setattr(M, "AlexNet", real_weights)
    data = tiny_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "runs")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        s = S.build(cfg, DistEnv(), CUDA)
    assert asked == [CUDA]
    return s, mode


def test_build_puts_every_tensor_of_the_session_on_its_device(fake_cuda_session):
    s, _ = fake_cuda_session
    assert {p.device for p in s.model.parameters()} == {CUDA}
    assert s.epoch_sums.device == CUDA  # was created on the CPU: the first step crashed


def test_training_step_bookkeeping_stays_on_the_device(fake_cuda_session):
    s, mode = fake_cuda_session
    with mode:
        first_bad = torch.full((), T.NO_BAD_STEP, dtype=torch.int64, device=CUDA)
        loss, wrong = torch.randn((), device=CUDA), torch.randint(0, 16, (), device=CUDA)
        first_bad = T.account(s, loss, wrong, 16, first_bad)
        assert first_bad.device == CUDA and s.epoch_sums.device == CUDA
        payload = s.epoch_sums.clone()  # what epoch_metrics all-reduces
        assert payload.device == CUDA


def test_evaluation_counts_on_the_device():
    """The per-class tallies of validation and ``alexnet evaluate`` (top-1, top-5) on a
    non-CPU device (meta: fake CUDA tensors cannot be indexed without the CUDA library)."""
    meta = torch.device("meta")
    counts = Counts.zeros(4, meta)
    counts.add(torch.empty(5, 4, device=meta), torch.empty(5, dtype=torch.int64, device=meta))
    assert {t.device for t in counts.tensors()} == {meta}


@pytest.mark.parametrize("train", [True, False])
def test_augmentation_follows_its_images_off_the_cpu(fake_cuda_session, train):
    """Crops, flips, colour noise (PAPER B3, B4), mean subtraction (B2) and the ten views
    (B5) on a device other than the CPU. Fake tensors cannot run the index math (views of
    fake CUDA tensors need the CUDA library), so the meta device stands in: like CUDA it
    takes the batched gather path, and a buffer left on the CPU raises."""
    s, _ = fake_cuda_session
    aug = s.aug_train if train else s.aug_val
    meta = torch.device("meta")
    images = torch.empty(5, 3, 16, 16, dtype=torch.uint8, device=meta)
    out = aug(images, torch.Generator().manual_seed(0)) if train else aug.views(images, 10)
    assert out.device == meta and out.shape == (5 if train else 50, 3, 16, 16)


def test_restored_state_lands_on_the_device(fake_cuda_session, tmp_path, monkeypatch):
    """A checkpoint (saved on a CPU) restored into a CUDA session: the epoch sums go where
    the session runs, the loader position is restored and the random states are handed to
    the restore. Two host-side steps are left out here: torch's own ``load_state_dict``
    (fake tensors cannot copy host data into parameters) and the host random states
    themselves (under fake mode ``torch.set_rng_state`` and numpy's would read a fake
    tensor's memory: the process's generators would be left corrupt for the tests after;
    tests/test_checkpoint.py restores them for real)."""
    s, mode = fake_cuda_session
    monkeypatch.setattr(s.model, "load_state_dict", lambda state: None)
    restored = []
    monkeypatch.setattr(ckpt_io, "set_rng_state", lambda state, *g: restored.append((state, g)))
    ranks = [{"rng": ckpt_io.rng_state(s.generator), "epoch_sums": [1.0, 2.0, 3.0, 4.0]}]
    ck = s.state_dict(ranks)  # epoch sums: loss, wrong, images, seconds
    ck["model"] = {k: torch.zeros(v.shape) for k, v in ck["model"].items()}  # as saved: CPU
    with mode:
        s.load_state_dict(ck, tmp_path / "last.pt")
        assert s.epoch_sums.device == CUDA and s.epoch_seconds == 4.0
    assert s.batch_in_epoch == ck["sampler"]["start_batch"] and s.step == ck["step"]
    assert restored == [(ranks[0]["rng"], (s.generator,))]


def test_precision_on_cuda_means_what_it_means_for_training(tmp_path, monkeypatch):
    """On a (bf16-capable) CUDA device, inference resolves ``--precision`` as training does
    (``devices.resolve_precision``): auto and bf16 run torch in bf16 on the device (auto
    with the fp32 fallback when top-1 disagrees, bf16 by name without), fp32 leaves the
    model as it is; the engines are CPU-only and refuse, installed or not. The bf16 copy
    lives on the device and the fp32 reference is kept. Its forward needs CUDA's autocast
    (LRN's fp32 sums), which a CPU build of torch lacks: tests/test_gpu.py runs it on a GPU."""
    from alexnet.card import ModelCard
    from alexnet.interop import engines
    from alexnet.runtime.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    net = M.AlexNet(5, arch="small", image_size=28, widths=(8, 16, 16, 16, 8), fc_width=16)
    card = ModelCard.from_dict(
        {"model_config": net.config, "data_stats": {"mean": torch.zeros(3, 28, 28)}}
    )
    with FakeTensorMode(allow_non_fake_inputs=True):
        net = net.to(CUDA).eval()
        assert engines.for_inference(net, card, tmp_path, "torch", precision="fp32") is net
        for backend in ("openvino", "onnxruntime"):
            with pytest.raises(UserError, match="the engines run on the CPU"):
                engines.for_inference(net, card, tmp_path, backend, precision="bf16")
        for precision, fallback in (("auto", True), ("bf16", False)):
            wrapped = engines.for_inference(net, card, tmp_path, "auto", precision=precision)
            assert wrapped.choice == engines.Choice("torch", "bf16")
            assert wrapped.fallback is fallback
        assert all(p.dtype == torch.float32 for p in net.parameters())  # the reference kept
        copy = list(wrapped.runner.fn.parameters())
        assert copy and all(p.dtype == torch.bfloat16 and p.device == CUDA for p in copy)
        features = engines.for_inference(net, card, tmp_path, "auto", layer="fc7")
        assert features is net  # no top-1 to check bf16 by: fp32, as on the CPU


def test_the_fused_optimizer_step_gets_its_arguments_on_the_device(fake_cuda_session, monkeypatch):
    """PaperSGD's fused step (PAPER D1) on CUDA parameters: every tensor it hands torch's
    fused kernel, its grad scale included, is on their device (a CPU scalar would be a
    cross-device argument). The kernel has no fake implementation, so a recorder stands in."""
    s, mode = fake_cuda_session
    seen = []
    monkeypatch.setattr(
        torch, "_fused_sgd_", lambda *lists, grad_scale, **kw: seen.append((lists, grad_scale))
    )
    with mode:
        for p in s.model.parameters():
            p.grad = torch.randn(p.shape, device=CUDA)
        s.optimizer.step()
    assert seen, "the fused kernel was not called"
    for lists, scale in seen:
        assert {t.device for ts in lists for t in ts} | {scale.device} == {CUDA}


# -- the step and the validation loop on a device, op by op ----------------------------------
@pytest.fixture
def meta_session(tmp_path: Path, monkeypatch):
    """``build`` on the meta device (tests/devicekit.py): the real network runs forward and
    backward there. The augmentation draws on the device itself (generator None), as a
    CUDA generator would; the fused optimizer step is recorded (no meta kernel)."""
    from alexnet import optim

    monkeypatch.setattr(devices, "generator", lambda device, seed: torch.Generator())
    monkeypatch.setattr(optim, "FUSED_DEVICES", ("cpu", "cuda", "meta"))
    fused = []
    monkeypatch.setattr(torch, "_fused_sgd_", lambda *a, **kw: fused.append(kw["grad_scale"]))
    data = tiny_data(tmp_path / "data")
    s = S.build(tiny_config(data, tmp_path / "runs"), DistEnv(), META)
    s.generator = None
    return s, fused


def test_the_training_step_stays_on_the_device_without_waiting_for_it(meta_session):
    """One D1 step (PAPER B2-B4 augmentation, forward, loss, backward, the fused update)
    and its bookkeeping: the batch is the only thing copied up, nothing host-side mixes in
    (labels left on the host would), no value is read back, and no Python number is copied
    up (the fused step's 1/lr once was, twice a step)."""
    s, fused = meta_session
    images = torch.randint(0, 255, (16, 3, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 4, (16,))
    first_bad = torch.full((), T.NO_BAD_STEP, dtype=torch.int64, device=META)
    T.train_step(s, images, labels, 0.01)  # the first step copies the mean image etc. up once
    for lr in (0.01, 0.001):
        with DeviceAudit(allowed_uploads=2) as audit:
            loss, wrong = T.train_step(s, images, labels, lr)
            first_bad = T.account(s, loss, wrong, 16, first_bad)
        assert (audit.mixed, audit.uploads, audit.syncs) == ([], [], [])
    assert len(fused) == 6 and {t.device for t in fused} == {META}  # 2 groups x 3 steps
    assert loss.device == META and s.epoch_sums.device == META


def test_validation_stays_on_the_device_until_its_result(meta_session):
    """The validation loop (centre views, loss, top-1/top-5 counts): each batch copied up,
    the views' places made once (they were copied up every batch), the loss summed on the
    device (a host accumulator would read it back every batch), and the four numbers read
    back once, after the last batch."""
    s, _ = meta_session
    batches = len(s.val_loader)
    assert batches == 2
    with DeviceAudit(allowed_uploads=99):  # answers the final read-backs (meta has no data)
        T.validate(s)  # the first copies the mean image and the views' places up, once
    with DeviceAudit(allowed_uploads=2 * batches) as audit:
        T.validate(s)
    assert audit.mixed == [] and audit.uploads == []
    assert len(audit.syncs) == 4, audit.syncs


@pytest.mark.parametrize("local_rank", [0, 1, 3])
def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch, tmp_path, local_rank):
    """Under torchrun, process LOCAL_RANK of each node uses GPU LOCAL_RANK: a run that took
    GPU 0 in every process would put a node's processes on one GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    env = DistEnv(rank=4 + local_rank, world_size=8, local_rank=local_rank)
    cfg = tiny_config(tiny_data(tmp_path / "data"), tmp_path / "runs", **{"run.device": "cuda"})
    assert T._check_setup(cfg, env) == torch.device("cuda", local_rank)
    cfg.run.device = "auto"
    assert T._check_setup(cfg, env) == torch.device("cuda", local_rank)
    cfg.run.device = "cuda:2"  # named: that one, whatever the rank
    assert T._check_setup(cfg, env) == torch.device("cuda", 2)
