"""DDP with the fused modules: two gloo processes on CPU train a small net with each module, and
end where the eager modules end under the same DDP run, and — where the net's batch statistics
do not couple the samples — where one process training on the whole batch ends.

With a BatchNorm in training mode inside the attention module (HAM, CBAM, SE with a norm layer)
each process normalises with its own half-batch statistics, as eager PyTorch does under DDP, so
those runs are compared with eager DDP only (and, with the attention module in eval, with one
process). SyncBatchNorm synchronises statistics only for GPU tensors (DDP refuses it on CPU, for the eager
and the fused module alike; the fused module hands a synchronising SyncBatchNorm to the eager
module); its GPU test needs two GPUs."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fusedattn
from fusedattn import reference

STEPS = 2
MODULES = {
    "simam": (fusedattn.SimAM, reference.SimAM),
    "ham": (fusedattn.HAM, reference.HAM),
    "se": (lambda c: fusedattn.SE(c, rd_ratio=0.25), lambda c: reference.SE(c, rd_ratio=0.25)),
    "se_bn": (lambda c: fusedattn.SE(c, rd_ratio=0.25, norm_layer=nn.BatchNorm2d),
              lambda c: reference.SE(c, rd_ratio=0.25, norm_layer=nn.BatchNorm2d)),
    "eca": (fusedattn.ECA, reference.ECA),
    "cbam": (lambda c: fusedattn.CBAM(c, rd_ratio=0.25), lambda c: reference.CBAM(c, rd_ratio=0.25)),
}
COUPLED = ("ham", "se_bn", "cbam")  # a BatchNorm in training couples the samples


def _net(make, attn_eval: bool):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), make(8), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 4)).double()
    if attn_eval:
        net[1].eval()
    return net


def _data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(8, 3, 6, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (8,), generator=g))


def _train(net, x, y):
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    inner = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
    return {k: v.detach().clone() for k, v in inner.state_dict().items()}


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x, y = _data()
    half = slice(rank * 4, rank * 4 + 4)
    results = {}
    for name, (fused, eager) in MODULES.items():
        for attn_eval in (False, True):
            for kind, make in (("fused", fused), ("eager", eager)):
                net = nn.parallel.DistributedDataParallel(_net(make, attn_eval))
                results[name, attn_eval, kind] = _train(net, x[half], y[half])
                if kind == "fused":
                    results[name, attn_eval, "backend"] = fusedattn.last_backend(
                        name.split("_")[0])
    for kind, make in (("fused", MODULES["ham"][0]), ("eager", MODULES["ham"][1])):
        net = nn.SyncBatchNorm.convert_sync_batchnorm(_net(make, False))
        if kind == "fused":
            results["syncbn", "reason"] = net[1]._unfusable()
        try:
            nn.parallel.DistributedDataParallel(net)(x[half])
            results["syncbn", kind] = "ran"
        except ValueError as exc:
            results["syncbn", kind] = str(exc)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "results.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return torch.load(out)


def _assert_same(a, b, what):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].double(), b[k].double(), rtol=1e-10, atol=1e-12,
                                   msg=f"{what}: {k}")


@pytest.mark.parametrize("attn_eval", [False, True], ids=["train", "attn-eval"])
@pytest.mark.parametrize("name", MODULES)
def test_ddp_fused_equals_eager_ddp(ddp_results, name, attn_eval):
    assert ddp_results[name, attn_eval, "backend"] == "cpu"
    _assert_same(ddp_results[name, attn_eval, "fused"], ddp_results[name, attn_eval, "eager"],
                 f"{name}: fused DDP vs eager DDP")


@pytest.mark.parametrize("name, attn_eval", [
    (n, e) for n in MODULES for e in (False, True) if e or n not in COUPLED])
def test_ddp_equals_one_process_on_the_whole_batch(ddp_results, name, attn_eval):
    x, y = _data()
    single = _train(_net(MODULES[name][0], attn_eval), x, y)
    _assert_same(ddp_results[name, attn_eval, "fused"], single,
                 f"{name}: 2-process DDP vs one process")


def test_syncbn_under_ddp(ddp_results):
    """SyncBatchNorm in a process group of two: the fused module would hand it to the eager
    module (it cannot synchronise statistics itself); on CPU, DDP refuses it for both, as torch
    does."""
    assert "SyncBatchNorm synchronises" in ddp_results["syncbn", "reason"]
    assert "GPU" in ddp_results["syncbn", "eager"]
    assert ddp_results["syncbn", "fused"] == ddp_results["syncbn", "eager"]


def _worker_gpu(rank, world, port, out):  # pragma: no cover - two-GPU machines only
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    x, y = _data()
    half = slice(rank * 4, rank * 4 + 4)
    results = {}
    for name in ("ham", "se_bn", "cbam"):
        for kind, make in zip(("fused", "eager"), MODULES[name]):
            net = nn.SyncBatchNorm.convert_sync_batchnorm(_net(make, False)).cuda(rank)
            net = nn.parallel.DistributedDataParallel(net, device_ids=[rank])
            results[name, kind] = _train(net, x[half].cuda(rank), y[half].cuda(rank))
    if rank == 0:
        torch.save({k: {n: t.cpu() for n, t in v.items()} for k, v in results.items()}, out)
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (SyncBatchNorm "
                    "synchronises only CUDA tensors)")
def test_syncbn_ddp_gpu(tmp_path):  # pragma: no cover - two-GPU machines only
    out = tmp_path / "results.pt"
    mp.spawn(_worker_gpu, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    results = torch.load(out)
    for name in ("ham", "se_bn", "cbam"):
        _assert_same(results[name, "fused"], results[name, "eager"], f"{name} SyncBatchNorm DDP")
