"""The training form compiles; the deployed form exports with torch.export and ONNX (run in onnxruntime)."""

from __future__ import annotations

import pytest
import torch

import convzoo
from convzoo import DOConv2d
from convzoo.testing import make_trained_like_


def test_torch_compile_training_form_matches_eager() -> None:
    layer = DOConv2d(4, 6, 3, 1, 1, groups=2)
    with torch.no_grad():
        layer.d_delta.normal_(0, 0.1)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    out = compiled(x)
    torch.testing.assert_close(out, layer(x))
    out.sum().backward()
    assert layer.d_delta.grad is not None and layer.W.grad is not None


@pytest.mark.slow
def test_torch_compile_inductor_training_step() -> None:
    model = convzoo.create_model("cifar_resnet20", conv="doconv")
    compiled = torch.compile(model)
    x = torch.randn(4, 3, 32, 32)
    loss = compiled(x).logsumexp(1).mean()
    loss.backward()
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def _trained(name: str, kind: str) -> torch.nn.Module:
    """A model of ``kind`` in a trained-like state (random BN statistics and D', CAC half sharp)."""
    torch.manual_seed(0)
    return make_trained_like_(convzoo.create_model(name, conv=kind), torch.randn(4, 3, 32, 32))


EXPORTED = [
    ("cifar_resnet20", "doconv"),
    ("cifar_resnet20", "cac"),
    ("cifar_resnet20", "multiception"),
    ("cifar_resnet20", "cpwc"),
    ("cifar_mobilenetv2", "dds"),
    ("cifar_mobilenetv2", "pyramid"),
]


@pytest.mark.parametrize(("name", "kind"), EXPORTED, ids=[kind for _, kind in EXPORTED])
def test_torch_export_of_deployed_model(name: str, kind: str) -> None:
    model = _trained(name, kind)
    deployed = convzoo.deploy(model)
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(deployed, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["doconv", "cac", "multiception"])
def test_onnx_export_of_deployed_model_runs_in_onnxruntime(tmp_path, kind: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _trained("cifar_resnet20", kind)
    deployed = convzoo.deploy(model)
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / f"resnet20_{kind}.onnx"
    torch.onnx.export(deployed, (x,), str(path), input_names=["images"], output_names=["logits"], dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(x), rtol=1e-4, atol=1e-4)


DYNAMIC_LAYERS = {  # kind: the conv it replaces (stride 2: output sizes round down on odd inputs)
    "doconv": lambda: torch.nn.Conv2d(8, 8, 3, 2, 1),
    "cac": lambda: torch.nn.Conv2d(8, 8, 3, 2, 1),
    "cpwc": lambda: torch.nn.Conv2d(8, 8, 1),
    "dds": lambda: torch.nn.Conv2d(8, 8, 3, 2, 1),
    "pyramid": lambda: torch.nn.Conv2d(12, 12, 3, 2, 1, groups=12),
    "dsconv": lambda: torch.nn.Conv2d(8, 8, 3, 2, 1),
    "mixconv": lambda: torch.nn.Conv2d(8, 8, 3, 2, 1),
    "multiception": lambda: torch.nn.Conv2d(8, 8, 3, 2, 1),
}


def _one_layer(kind: str, form: str, *, size: tuple[int, int] = (11, 13)) -> tuple[torch.nn.Module, torch.Tensor]:
    """(a float64 model of one trained-like ``kind`` layer + BN, in ``form`` "train" / "eval" / "deployed",
    an input (2, C, *size))."""
    torch.manual_seed(0)
    conv = DYNAMIC_LAYERS[kind]()
    model = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(conv.out_channels)).double()
    x = torch.randn(2, conv.in_channels, *size, dtype=torch.float64)
    model = make_trained_like_(convzoo.convert(model, kind), x)
    if form == "deployed":
        model = convzoo.deploy(model)
    return model.train(form == "train"), x


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. CAC kept export's fake tensors in last_mask
@pytest.mark.parametrize("deployed", [True, False], ids=["deployed", "eval"])
@pytest.mark.parametrize("kind", sorted(DYNAMIC_LAYERS))
def test_torch_export_with_dynamic_batch_and_image_size(kind: str, deployed: bool) -> None:
    """One export serves every batch and image size. CAC's output size was math.floor of a true division,
    and its slices were truncated to it, which torch.export could not prove in bounds: any dynamic H / W
    failed. The CAC layer keeps no tensor of the trace in its statistics."""
    model, x = _one_layer(kind, "deployed" if deployed else "eval", size=(16, 16))
    batch = torch.export.Dim("batch", min=2, max=64)
    # from 4: torch's own conv guards a stride-2 output size of 1 (a plain nn.Conv2d fails below that too)
    height, width = torch.export.Dim("height", min=4, max=64), torch.export.Dim("width", min=4, max=64)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch, 2: height, 3: width},))
    other = torch.randn(3, x.shape[1], 13, 21, dtype=torch.float64)
    recorded = [getattr(m, "last_mask", None) for m in model.modules()]
    assert not any(isinstance(t, torch._subclasses.FakeTensor) for t in recorded)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(other), model(other), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form", ["train", "eval", "deployed"])
@pytest.mark.parametrize("kind", sorted(DYNAMIC_LAYERS))
def test_fx_symbolic_trace_equals_the_module(kind: str, form: str) -> None:
    """torch.fx.symbolic_trace (FX quantization, torchvision's create_feature_extractor) traces every form.
    DO-Conv's weight and CAC's pick used to branch on traced values; both are fx-wrapped calls now, which
    choose their path when the graph runs, so the traced training form also trains CAC's γ and β."""
    model, x = _one_layer(kind, form)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-10, atol=1e-10)
    if form == "train":
        grads = [torch.autograd.grad(m(x).square().sum(), list(model.parameters())) for m in (traced, model)]
        for traced_grad, grad in zip(*grads):
            torch.testing.assert_close(traced_grad, grad, rtol=1e-10, atol=1e-10)


def test_create_feature_extractor_on_a_converted_resnet() -> None:
    from torchvision.models import resnet18
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    for kind in ("doconv", "cac"):
        model = convzoo.convert(resnet18(num_classes=10), kind).eval()
        extractor = create_feature_extractor(model, {"layer2": "features", "fc": "logits"})
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(extractor(x)["logits"], model(x))


SCRIPTABLE_DEPLOYED = {"doconv", "dds", "pyramid", "dsconv", "mixconv"}  # plain torch modules once deployed


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script itself is deprecated in torch 2.14
@pytest.mark.parametrize("form", ["train", "deployed"])
@pytest.mark.parametrize("kind", sorted(DYNAMIC_LAYERS))
def test_torch_jit_script_compiles_or_refuses_clearly(kind: str, form: str) -> None:
    """Deployed forms made of plain modules script; the others refuse with a TypeError that names them and
    the way out, instead of failing inside the TorchScript compiler ("Unknown type annotation: 'ConvSpec'"),
    and the refusal leaves the model as it was (no module swapped in place)."""
    model, x = _one_layer(kind, form)
    if (form == "deployed" and kind in SCRIPTABLE_DEPLOYED) or kind == "dds":
        scripted = torch.jit.script(model)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), model(x), rtol=1e-10, atol=1e-10)
    else:
        before = [type(m) for m in model.modules()]
        with pytest.raises(TypeError, match=rf"torch.jit.script cannot compile {type(model[0]).__name__}: export"):
            torch.jit.script(model)
        assert [type(m) for m in model.modules()] == before


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_an_always_sharp_cac_layer_refuses_torchscript_and_stays_a_cac_layer() -> None:
    """It is an nn.Conv2d subclass that records ρ: swapping in a plain conv for the compiler (through
    __prepare_scriptable__) would replace it in the user's model too, hiding it from CAC statistics."""
    from convzoo.ops.cac_sharp import CACSharpConv2d

    model = convzoo.deploy(convzoo.convert(torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, 2, 1)), "cac"))
    assert isinstance(model[0], CACSharpConv2d)
    with pytest.raises(TypeError, match="torch.jit.script cannot compile CACSharpConv2d"):
        torch.jit.script(model)
    assert isinstance(model[0], CACSharpConv2d) and convzoo.has_cac_layers(model)
