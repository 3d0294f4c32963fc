"""Export of models holding fused modules: torch.export (records our ops; the exported program
runs them), torch.jit.trace (records the eager reference's ATen ops; saves and loads without
fusedattn's ops in the graph) and torch.onnx.export(dynamo=True) (standard ONNX ops that
onnxruntime runs with the same outputs)."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

import fusedattn
from fusedattn import models
from helpers import Block

MODULES = {
    "simam": lambda c: fusedattn.SimAM(c),
    "ham": lambda c: fusedattn.HAM(c),
    "se": lambda c: fusedattn.SE(c, rd_ratio=0.25),
    "eca": lambda c: fusedattn.ECA(c),
    "cbam": lambda c: fusedattn.CBAM(c, rd_ratio=0.25),
}


def _net(name):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Block(MODULES[name]),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _x():
    return torch.randn(2, 3, 12, 10)


def _fusedattn_nodes(graph_ops):
    return [op for op in graph_ops if "fusedattn" in op]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", MODULES)
def test_torch_export_runs_fused_ops(name, mode):
    net = getattr(_net(name), mode)()
    twin = copy.deepcopy(net)
    x = _x()
    ep = torch.export.export(net, (x,))
    ops = [str(n.target) for gm in ep.graph_module.modules() if hasattr(gm, "graph")
           for n in gm.graph.nodes if n.op == "call_function"]
    assert _fusedattn_nodes(ops), "the exported program should call the fused ops"
    y = ep.module()(x)
    torch.testing.assert_close(y, twin(x), rtol=1e-5, atol=1e-6)
    if mode == "train":  # BatchNorm statistics move in the exported program as in the module
        for (k, b), b2 in zip(ep.module().named_buffers(), twin.buffers()):
            torch.testing.assert_close(b, b2, rtol=1e-5, atol=1e-6, msg=k)


def test_torch_export_converted_real_model():
    model = fusedattn.convert(models.build("tv_resnet18_simam_ham")).eval()
    x = torch.randn(1, 3, 64, 64)
    ep = torch.export.export(model, (x,))
    torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.export.load(buf).module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODULES)
def test_jit_trace_records_reference_math(name):
    net = _net(name).eval()
    x = _x()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trace's deprecation and shape-as-constant warnings
        traced = torch.jit.trace(net, x)
    kinds = [n.kind() for n in traced.inlined_graph.nodes()]
    assert not _fusedattn_nodes(kinds) and "prim::PythonOp" not in kinds
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x2 = torch.randn(3, 3, 12, 10)
    torch.testing.assert_close(loaded(x2), net(x2), rtol=1e-5, atol=1e-6)
    assert fusedattn.last_backend(name) == "cpu"  # outside the trace the fused ops run


def _onnx_run(model, x):
    ort = pytest.importorskip("onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    proto = program.model_proto
    domains = {n.domain for n in proto.graph.node} | {
        n.domain for f in proto.functions for n in f.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains {domains}"
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("name", MODULES)
def test_onnx_export_onnxruntime(name):
    net = _net(name).eval()
    x = _x()
    torch.testing.assert_close(_onnx_run(net, x), net(x), rtol=1e-4, atol=1e-5)


def test_onnx_ham_ties_like_torch():
    """HAM's channel split breaks ties to the lower channel; the ONNX graph (TopK) does too."""
    ham = fusedattn.HAM(16).eval()
    x = torch.ones(2, 16, 5, 5)  # every interior channel gets the same attention value
    x[1] *= 2
    assert len(torch.unique(ham.channel_attention(x)[0])) < 16
    torch.testing.assert_close(_onnx_run(ham, x), ham(x), rtol=1e-5, atol=1e-6)


def test_onnx_export_converted_timm_model():
    model = fusedattn.convert(models.build("seresnet50")).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(_onnx_run(model, x), model(x), rtol=1e-4, atol=1e-4)
