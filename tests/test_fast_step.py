"""The fast training step: compiled flows, bf16 autocast, the captured step, and their numbers against eager."""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
from torch import Tensor, nn

from pyro_nf import FlowModel
from pyro_nf.compiled import compile_flow, compiled_blocks
from pyro_nf.metrics import bits_per_dim
from pyro_nf.nn.conv import GlowNet
from pyro_nf.training.step import TrainingStep, autocast
from pyro_nf.transforms import ActNorm, ImageCoupling, conditional_glow, glow, realnvp_multiscale
from tests.contract import CASES, instantiate

glow_module = importlib.import_module("pyro_nf.transforms.glow")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SHAPE = (1, 8, 8)


def _glow_model(seed: int = 0, **options: object) -> FlowModel:
    torch.manual_seed(seed)
    return FlowModel(glow(SHAPE, levels=2, depth=2, hidden_channels=8, **options), SHAPE).train()  # type: ignore[arg-type]


def _batch(seed: int = 1, n: int = 16) -> Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) - 0.5


def _loss(model: nn.Module) -> object:
    return lambda x: bits_per_dim(model(x), SHAPE, 256).mean()


def _initialised(model: FlowModel) -> FlowModel:
    with torch.no_grad():
        model(_batch(0))
    return model


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_a_glow_step_compiles_without_a_graph_break(direction: str) -> None:
    torch.manual_seed(0)
    step = glow_module.GlowStep((4, 4, 4), hidden_channels=8).train()
    x = torch.randn(6, 4, 4, 4)
    step.inverse_and_log_det(x)  # ActNorm's initialisation
    method = step.forward_and_log_det if direction == "forward" else step.inverse_and_log_det
    explained = torch._dynamo.explain(method)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    compiled = torch.compile(method, backend="aot_eager", fullgraph=True)
    for got, expected in zip(compiled(x), method(x)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_fresh_glow_compiles_whole_and_initialises_actnorm_as_eager_does() -> None:
    """fullgraph=True: the data-dependent initialisation reads no flag back under compilation."""
    eager, compiled = _glow_model(), _glow_model()
    run = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    x = _batch()
    torch.testing.assert_close(run(x), eager(x), rtol=0, atol=0)
    norms = [(a, b) for a, b in zip(eager.modules(), compiled.modules()) if isinstance(a, ActNorm)]
    assert norms and all(bool(b.initialised) and b._checked for _, b in norms)
    for a, b in norms:
        assert torch.equal(a.loc, b.loc) and torch.equal(a.log_scale, b.log_scale)
    torch.testing.assert_close(run(_batch(2)), eager(_batch(2)), rtol=0, atol=0)  # the fused path, compiled again


def test_a_whole_model_compiles_in_one_graph_with_distribution_checks_on() -> None:
    """The base Normal skips its argument checks while compiling, whatever torch's default (Pyro's switch) says."""
    before = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(True)
    try:
        model = _initialised(_glow_model())
        run = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(run(_batch(4)), model(_batch(4)), rtol=0, atol=0)
    finally:
        torch.distributions.Distribution.set_default_validate_args(before)


def test_a_loaded_glow_keeps_its_initialisation_under_compilation() -> None:
    trained = _initialised(_glow_model())
    fresh = _glow_model(seed=5)
    fresh.load_state_dict(trained.state_dict())
    run = torch.compile(fresh, backend="aot_eager", fullgraph=True)
    x = _batch(3)
    torch.testing.assert_close(run(x), trained(x), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), fresh.state_dict().values()))


def test_compiled_blocks_are_the_repeated_units() -> None:
    flow = glow(SHAPE, levels=2, depth=3, hidden_channels=8)
    kinds = [type(b).__name__ for b in compiled_blocks(flow)]
    assert kinds.count("GlowStep") == 6 and kinds.count("ImageCoupling") == 1  # the one learned prior
    multiscale = realnvp_multiscale(SHAPE, levels=1, hidden_channels=8, num_blocks=1, actnorm=True)
    assert {type(b) for b in compiled_blocks(multiscale)} == {ActNorm, ImageCoupling}
    with pytest.raises(TypeError, match="expected an nn.Module"):
        compile_flow(object())  # type: ignore[arg-type]


def test_a_compiled_flow_is_not_compiled_in_its_copies() -> None:
    model = compile_flow(_glow_model(), backend="aot_eager")
    assert any("_inverse_and_log_det" in vars(b) for b in compiled_blocks(model))
    copied = copy.deepcopy(model)
    assert not any("_inverse_and_log_det" in vars(b) for b in compiled_blocks(copied))
    torch.testing.assert_close(copied(_batch()), model(_batch()), rtol=0, atol=0)


def _compare_steps(expected: TrainingStep, got: TrainingStep, batches: list[Tensor], tolerance: float) -> None:
    """Each step from the same state (the expected side's, copied over): the same loss, gradient norm and gradients.

    The state is copied before every step because Adam's first updates are ``lr * sign(g)``: a gradient that is
    zero up to rounding (ActNorm's shift right after its initialisation) moves either way, so trajectories part
    by more than the rounding of one step.
    """
    for i, x in enumerate(batches):
        if i:
            with torch.no_grad():  # in place: a captured step reads these very tensors
                for p, q in zip(expected.params, got.params):
                    q.copy_(p)
                    for key, value in expected.optimizer.state[p].items():
                        got.optimizer.state[q][key].copy_(value)
        a, b = expected(x), got(x)
        torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance)
        scale = max(p.grad.abs().max().item() for p in expected.params)  # type: ignore[union-attr]
        for p, q in zip(expected.params, got.params):
            torch.testing.assert_close(q.grad, p.grad, rtol=tolerance, atol=tolerance * scale)


def _make_step(model: FlowModel, **modes: object) -> TrainingStep:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return TrainingStep(model, optimizer, _loss(model), grad_clip=50.0, **modes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [
        _glow_model,
        lambda: FlowModel(
            realnvp_multiscale(SHAPE, levels=1, hidden_channels=8, num_blocks=1, actnorm=True, learned_prior=True),
            SHAPE,
        ).train(),
    ],
    ids=["glow", "realnvp_multiscale"],
)
def test_a_compiled_step_gives_the_eager_loss_and_gradients(make) -> None:  # type: ignore[no-untyped-def]
    """Inductor, from a fresh model: ActNorm is initialised inside the first compiled step; fused Adam on both sides."""
    torch.manual_seed(0)
    eager = _make_step(make(), fused_optimizer=True)
    torch.manual_seed(0)
    compiled = _make_step(make(), compile=True)
    _compare_steps(eager, compiled, [_batch(seed) for seed in (1, 2, 3)], 1e-5)


def test_a_compiled_step_takes_a_batch_of_one_and_a_partial_batch() -> None:
    """Inductor over a batch of one, then of five (each shape compiled statically): the eager losses."""
    torch.manual_seed(0)
    eager = _make_step(_glow_model(), fused_optimizer=True)
    torch.manual_seed(0)
    compiled = _make_step(_glow_model(), compile=True)
    _compare_steps(eager, compiled, [_batch(1, n=1), _batch(2, n=5)], 1e-5)


def test_a_step_compiled_whole_gives_the_eager_loss_and_gradients() -> None:
    """``compile="whole"``: the loss as one inductor graph; ActNorm initialised eagerly first, as eager does."""
    torch.manual_seed(0)
    eager = _make_step(_glow_model(), fused_optimizer=True)
    torch.manual_seed(0)
    compiled = _make_step(_glow_model(), compile="whole", compile_options={"fullgraph": True})
    assert compiled.compile_scope == "whole" and compiled.compiled
    _compare_steps(eager, compiled, [_batch(seed) for seed in (1, 2, 3)], 1e-5)


@pytest.mark.parametrize(
    ("compile", "error"), [("model", ValueError), (1, TypeError), (None, TypeError)], ids=["name", "int", "none"]
)
def test_a_compile_scope_not_known_is_a_clear_error(compile: object, error: type[Exception]) -> None:
    model = _glow_model()
    with pytest.raises(error, match="compile"):
        _make_step(model, compile=compile)


def test_the_eager_step_is_the_plain_loop() -> None:
    """Eager, float32: exactly what zero_grad, backward, clip_grad_norm_ and Adam.step give."""
    a, b = _initialised(_glow_model()), _initialised(_glow_model())
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-3)
    step = TrainingStep(b, torch.optim.Adam(b.parameters(), lr=1e-3), _loss(b), grad_clip=1.0)
    for seed in (1, 2, 3):
        x = _batch(seed)
        opt_a.zero_grad(set_to_none=True)
        loss = bits_per_dim(a(x), SHAPE, 256).mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(a.parameters(), 1.0)
        opt_a.step()
        assert torch.equal(step(x), torch.stack([loss.detach(), norm]))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    step.set_lr(0.5)
    assert step.optimizer.param_groups[0]["lr"] == 0.5


def test_bf16_runs_the_networks_in_bf16_and_the_log_dets_in_float32() -> None:
    model = _initialised(_glow_model())
    network_dtypes: list[torch.dtype] = []
    log_det_dtypes: list[torch.dtype] = []
    for m in model.modules():
        if isinstance(m, GlowNet):
            m.register_forward_hook(lambda _m, _i, out: network_dtypes.append(out.dtype))
    couplings = [m for m in model.modules() if isinstance(m, ImageCoupling)]
    for layer in couplings:
        inverse = layer._inverse_and_log_det

        def recorded(y: Tensor, inverse=inverse) -> tuple[Tensor, Tensor]:  # type: ignore[no-untyped-def]
            x, log_det = inverse(y)
            log_det_dtypes.append(log_det.dtype)
            return x, log_det

        layer._inverse_and_log_det = recorded  # type: ignore[method-assign]
    x = _batch()
    with autocast("cpu", "bf16"):
        log_p_bf16 = model(x)
        z, log_det = model.flow.inverse_and_log_det(x)
    assert network_dtypes and set(network_dtypes) == {torch.bfloat16}
    assert log_det_dtypes and set(log_det_dtypes) == {torch.float32}
    assert log_p_bf16.dtype == z.dtype == log_det.dtype == torch.float32
    log_p = model(x)
    # bf16 keeps 8 bits of mantissa: the networks' outputs, so the log-density, agree to about 2^-8 relative.
    assert (log_p_bf16 - log_p).abs().max() <= 2**-8 * log_p.abs().max()


def test_bf16_training_step_reports_a_float32_loss() -> None:
    model = _initialised(_glow_model())
    step = TrainingStep(model, torch.optim.Adam(model.parameters(), lr=1e-3), _loss(model), precision="bf16")
    reported = step(_batch())
    assert reported.dtype == torch.float32 and all(math.isfinite(v) for v in reported.tolist())
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())  # type: ignore[union-attr]


def test_conditional_glow_compiles_its_unconditional_part() -> None:
    torch.manual_seed(0)
    flow = conditional_glow(SHAPE, 3, levels=2, depth=1, hidden_channels=8)
    kinds = {type(b).__name__ for b in compiled_blocks(flow)}
    assert kinds == {"GlowStep", "ImageCoupling"}


def test_training_step_rejects_bad_arguments() -> None:
    model = _glow_model()
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="precision: expected one of \\['fp32', 'bf16'\\], got 'fp16'"):
        TrainingStep(model, optimizer, _loss(model), precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grad_clip"):
        TrainingStep(model, optimizer, _loss(model), grad_clip=-1.0)
    with pytest.raises(TypeError, match="has no fused, capturable form"):
        TrainingStep(model, torch.optim.LBFGS(model.parameters()), _loss(model), fused_optimizer=True)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda_graph=True needs a CUDA device"):
            TrainingStep(model, optimizer, _loss(model), cuda_graph=True)


IMAGE_CASES = [c for c in CASES if not c.vector and c.name != "ffjord_multiscale"]


@pytest.mark.parametrize("case", IMAGE_CASES, ids=str)
def test_compiled_image_transforms_give_the_eager_numbers(case) -> None:  # type: ignore[no-untyped-def]
    """Every image case of the contract suite, compiled (aot_eager), against itself eager: values and gradients.

    The whole suite runs compiled with ``PYRO_NF_COMPILE=aot_eager pytest tests/test_contract.py``.
    """
    eager = instantiate(case, batch=(5,), dtype=torch.float32)
    compiled = instantiate(case, batch=(5,), dtype=torch.float32)
    torch._dynamo.reset()
    compile_flow(compiled.owner, backend="aot_eager")
    if compiled.context is not None:
        compiled.context = eager.context
        compiled.transform = compiled.owner.condition(eager.context)  # type: ignore[operator]
    x = torch.randn(5, *case.shape, requires_grad=True)
    for method in ("forward_and_log_det", "inverse_and_log_det"):
        (y_a, ld_a), (y_b, ld_b) = getattr(eager.transform, method)(x), getattr(compiled.transform, method)(x)
        torch.testing.assert_close(y_b, y_a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ld_b, ld_a, rtol=1e-5, atol=1e-5)
        grads_a = torch.autograd.grad((y_a.square().sum() + ld_a.sum()), [x, *eager.owner.parameters()])
        grads_b = torch.autograd.grad((y_b.square().sum() + ld_b.sum()), [x, *compiled.owner.parameters()])
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_captured_step_gives_the_eager_loss_and_gradients(compiled: bool, precision: str) -> None:
    """The replayed graph against the eager step (fused Adam, same precision), from a fresh model; the rate changes."""
    eager = _make_step(_glow_model().cuda(), fused_optimizer=True, precision=precision)
    captured = _make_step(_glow_model().cuda(), compile=compiled, cuda_graph=True, precision=precision)
    batches = [_batch(seed).cuda() for seed in (1, 2, 3)]
    for step in (eager, captured):
        step.set_lr(2e-3)
    # bf16: both sides round the networks alike, so only the order of float32 sums differs
    _compare_steps(eager, captured, batches, 1e-5 if precision == "fp32" else 1e-3)
    assert captured._graph is not None


@cuda
def test_a_captured_step_needs_the_first_shape() -> None:
    model = _glow_model().cuda()
    step = TrainingStep(model, torch.optim.Adam(model.parameters()), _loss(model), cuda_graph=True)
    step(_batch().cuda())
    with pytest.raises(ValueError, match="must match the capture"):
        step(_batch(n=8).cuda())
