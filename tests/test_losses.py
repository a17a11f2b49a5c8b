"""Tests for equiav.losses and equiav.distributed.

The references below are written from the equations (method.md section 6), one anchor at a
time, in float64; they share no code with the vectorised implementation. The two-process tests
run a real gloo process group on this machine.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from equiav import distributed as eqdist
from equiav.losses import REQUIRED_OUTPUTS, EquiAVLoss, InterModalLoss, IntraModalLoss

TAU = 0.07


# --------------------------------------------------------------------------- references


def _unit(x: Tensor) -> Tensor:
    return x.double() / x.double().norm(dim=1, keepdim=True)


def reference_intra(z_equi: Tensor, z_aug: Tensor, tau: float, positive_in_denominator: bool = True) -> Tensor:
    """Paper Eqs. 9-10 (or Eq. A without the positive), one anchor at a time."""
    q, p = _unit(z_equi), _unit(z_aug)
    return (
        reference_intra_term(q, p, tau, positive_in_denominator)
        + reference_intra_term(p, q, tau, positive_in_denominator)
    ) / 2


def reference_intra_term(anchors: Tensor, partners: Tensor, tau: float, positive_in_denominator: bool) -> Tensor:
    """One of the two terms of Eq. 10: anchors [N, E] against all partners and the other anchors."""
    n = anchors.shape[0]
    losses = []
    for i in range(n):
        positive = anchors[i] @ partners[i] / tau
        denominator = [anchors[i] @ partners[j] / tau for j in range(n) if positive_in_denominator or j != i]
        denominator += [anchors[i] @ anchors[j] / tau for j in range(n) if j != i]
        losses.append(torch.logsumexp(torch.stack(denominator), dim=0) - positive)
    return torch.stack(losses).mean()


def reference_intra_accuracy(z_equi: Tensor, z_aug: Tensor) -> float:
    q, p = _unit(z_equi), _unit(z_aug)
    n = q.shape[0]
    hits = 0
    for anchors, partners in ((q, p), (p, q)):
        for i in range(n):
            candidates = [(float(anchors[i] @ partners[j]), ("partner", j)) for j in range(n)]
            candidates += [(float(anchors[i] @ anchors[j]), ("same", j)) for j in range(n) if j != i]
            hits += max(candidates)[1] == ("partner", i)
    return hits / (2 * n)


def reference_inter(z_audio: Tensor, z_visual: Tensor, tau: float) -> Tensor:
    """Paper Eqs. 14-15 with stop-gradient keys, one query at a time."""
    a, v = _unit(z_audio), _unit(z_visual)
    n = a.shape[0]

    def term(queries: Tensor, keys: Tensor) -> Tensor:
        keys = keys.detach()
        losses = []
        for i in range(n):
            sims = torch.stack([queries[i] @ keys[j] / tau for j in range(n)])
            losses.append(torch.logsumexp(sims, dim=0) - sims[i])
        return torch.stack(losses).mean()

    return (term(a, v) + term(v, a)) / 2


def reference_inter_accuracy(z_audio: Tensor, z_visual: Tensor) -> float:
    a, v = _unit(z_audio), _unit(z_visual)
    n = a.shape[0]
    a2v = sum(int(torch.argmax(v @ a[i])) == i for i in range(n)) / n
    v2a = sum(int(torch.argmax(a @ v[i])) == i for i in range(n)) / n
    return (a2v + v2a) / 2


def _random(n: int, e: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    # Rows of different norms: the losses must normalise.
    return torch.randn(n, e, generator=g, dtype=dtype) * torch.rand(n, 1, generator=g, dtype=dtype).add(0.5)


# --------------------------------------------------------------------------- against the references


@pytest.mark.parametrize("positive_in_denominator", [True, False])
@pytest.mark.parametrize("tau", [TAU, 0.3])
def test_intra_matches_reference_values_and_gradients(positive_in_denominator: bool, tau: float) -> None:
    z_equi = _random(5, 7, seed=0).requires_grad_()
    z_aug = _random(5, 7, seed=1).requires_grad_()
    loss = IntraModalLoss(tau, positive_in_denominator)(z_equi, z_aug)
    expected = reference_intra(z_equi, z_aug, tau, positive_in_denominator)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(loss, [z_equi, z_aug])
    expected_grads = torch.autograd.grad(expected, [z_equi, z_aug])
    for got, want in zip(grads, expected_grads, strict=True):
        assert want.abs().max() > 1e-3  # a vanishing gradient would make the comparison vacuous
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_intra_accuracy_matches_reference() -> None:
    # Correlated views so that the accuracy is neither 0 nor 1.
    z_equi = _random(8, 4, seed=2)
    z_aug = z_equi + 0.8 * _random(8, 4, seed=3)
    _, accuracy = IntraModalLoss().loss_and_accuracy(z_equi, z_aug)
    expected = reference_intra_accuracy(z_equi, z_aug)
    assert 0 < expected < 1
    assert accuracy.item() == pytest.approx(expected)
    assert not accuracy.requires_grad


@pytest.mark.parametrize("tau", [TAU, 0.3])
def test_inter_matches_reference_values_and_gradients(tau: float) -> None:
    z_audio = _random(6, 5, seed=4).requires_grad_()
    z_visual = _random(6, 5, seed=5).requires_grad_()
    loss = InterModalLoss(tau)(z_audio, z_visual)
    expected = reference_inter(z_audio, z_visual, tau)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(loss, [z_audio, z_visual])
    expected_grads = torch.autograd.grad(expected, [z_audio, z_visual])
    for got, want in zip(grads, expected_grads, strict=True):
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_inter_keys_carry_no_gradient() -> None:
    # The reference's stop-gradient is the design choice: with live keys (plain CLIP loss) the
    # gradient differs, so the comparison above can tell the two apart.
    z_audio = _random(6, 5, seed=6).requires_grad_()
    z_visual = _random(6, 5, seed=7).requires_grad_()
    a, v = _unit(z_audio), _unit(z_visual)
    targets = torch.arange(6)
    live_keys = (
        torch.nn.functional.cross_entropy(a @ v.T / TAU, targets)
        + torch.nn.functional.cross_entropy(v @ a.T / TAU, targets)
    ) / 2
    ours = InterModalLoss()(z_audio, z_visual)
    torch.testing.assert_close(ours, live_keys)  # same value ...
    g_ours = torch.autograd.grad(ours, z_audio)[0]
    g_live = torch.autograd.grad(live_keys, z_audio)[0]
    assert not torch.allclose(g_ours, g_live, atol=1e-6)  # ... different gradient


def test_inter_accuracy_matches_reference() -> None:
    z_audio = _random(8, 4, seed=8)
    z_visual = z_audio + 0.8 * _random(8, 4, seed=9)
    _, accuracy = InterModalLoss().loss_and_accuracy(z_audio, z_visual)
    expected = reference_inter_accuracy(z_audio, z_visual)
    assert 0 < expected < 1
    assert accuracy.item() == pytest.approx(expected)


# --------------------------------------------------------------------------- analytic cases


@pytest.mark.parametrize("n", [1, 2, 7])
def test_identical_embeddings_give_log_2n_minus_1(n: int) -> None:
    z = _random(1, 6, seed=10).expand(n, 6)
    loss = IntraModalLoss()(z, z)
    assert loss.item() == pytest.approx(math.log(2 * n - 1), abs=1e-12)


def test_identical_embeddings_equimod_and_inter() -> None:
    n = 7
    z = _random(1, 6, seed=11).expand(n, 6)
    assert IntraModalLoss(positive_in_denominator=False)(z, z).item() == pytest.approx(math.log(2 * n - 2))
    assert InterModalLoss()(z, z).item() == pytest.approx(math.log(n))


def test_orthogonal_perfect_pairs() -> None:
    n, e, tau = 5, 8, 0.5
    # Perfect pairs, orthogonal across clips: s(pos) = 1/tau, every other similarity 0.
    z = torch.eye(n, e, dtype=torch.float64) * 3.0
    intra, intra_acc = IntraModalLoss(tau).loss_and_accuracy(z, z.clone())
    assert intra.item() == pytest.approx(math.log(1 + (2 * n - 2) * math.exp(-1 / tau)), rel=1e-12)
    assert intra_acc.item() == 1.0
    equimod = IntraModalLoss(tau, positive_in_denominator=False)(z, z.clone())
    assert equimod.item() == pytest.approx(-1 / tau + math.log(2 * n - 2), rel=1e-12)
    inter, inter_acc = InterModalLoss(tau).loss_and_accuracy(z, z.clone())
    assert inter.item() == pytest.approx(math.log(1 + (n - 1) * math.exp(-1 / tau)), rel=1e-12)
    assert inter_acc.item() == 1.0


def test_deranged_pairs_have_zero_accuracy() -> None:
    n = 6
    z = torch.eye(n, dtype=torch.float64)
    shifted = z.roll(1, dims=0)  # every positive is orthogonal to its anchor; a wrong candidate is identical
    assert IntraModalLoss().loss_and_accuracy(z, shifted)[1].item() == 0.0
    assert InterModalLoss().loss_and_accuracy(z, shifted)[1].item() == 0.0


@pytest.mark.parametrize("positive_in_denominator", [True, False])
def test_intra_is_symmetric_in_its_inputs(positive_in_denominator: bool) -> None:
    loss = IntraModalLoss(positive_in_denominator=positive_in_denominator)
    x, y = _random(6, 5, seed=12), _random(6, 5, seed=13)
    torch.testing.assert_close(loss(x, y), loss(y, x), rtol=1e-12, atol=1e-12)
    # Not vacuous: each of the two terms alone is not symmetric.
    one_way = reference_intra_term(_unit(x), _unit(y), TAU, positive_in_denominator)
    other_way = reference_intra_term(_unit(y), _unit(x), TAU, positive_in_denominator)
    assert not math.isclose(one_way.item(), other_way.item(), rel_tol=1e-6)


def test_inter_is_symmetric_and_scale_invariant() -> None:
    loss = InterModalLoss()
    x, y = _random(6, 5, seed=14), _random(6, 5, seed=15)
    torch.testing.assert_close(loss(x, y), loss(y, x), rtol=1e-12, atol=1e-12)
    scale = torch.linspace(0.1, 10, 6, dtype=torch.float64)[:, None]
    torch.testing.assert_close(loss(x * scale, y), loss(x, y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(IntraModalLoss()(x * scale, y), IntraModalLoss()(x, y), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- total loss


def _outputs(n: int, e: int, seed: int, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    return {key: _random(n, e, seed=seed + k, dtype=dtype) for k, key in enumerate(REQUIRED_OUTPUTS)}


def test_total_is_the_weighted_sum_of_the_terms() -> None:
    outputs = _outputs(6, 5, seed=20)
    outputs["ignored_extra_key"] = torch.zeros(1)
    result = EquiAVLoss(weight_inter=0.5, weight_audio=2.0, weight_visual=3.0)(outputs)
    inter = reference_inter(outputs["audio_inter"], outputs["visual_inter"], TAU)
    intra_a = reference_intra(outputs["audio_equi"], outputs["audio_aug"], TAU)
    intra_v = reference_intra(outputs["visual_equi"], outputs["visual_aug"], TAU)
    torch.testing.assert_close(result["inter"], inter)
    torch.testing.assert_close(result["intra_audio"], intra_a)
    torch.testing.assert_close(result["intra_visual"], intra_v)
    torch.testing.assert_close(result["loss"], 0.5 * inter + 2.0 * intra_a + 3.0 * intra_v)
    assert result["acc_inter"].item() == pytest.approx(
        reference_inter_accuracy(outputs["audio_inter"], outputs["visual_inter"])
    )
    assert result["acc_intra_audio"].item() == pytest.approx(
        reference_intra_accuracy(outputs["audio_equi"], outputs["audio_aug"])
    )
    assert result["acc_intra_visual"].item() == pytest.approx(
        reference_intra_accuracy(outputs["visual_equi"], outputs["visual_aug"])
    )
    assert set(result) == {
        "loss",
        "inter",
        "intra_audio",
        "intra_visual",
        "acc_inter",
        "acc_intra_audio",
        "acc_intra_visual",
    }


def test_release_weights_are_the_paper_loss_over_three() -> None:
    outputs = _outputs(4, 5, seed=30)
    paper = EquiAVLoss()(outputs)["loss"]
    release = EquiAVLoss(weight_inter=1 / 3, weight_audio=1 / 3, weight_visual=1 / 3)(outputs)["loss"]
    torch.testing.assert_close(release, paper / 3)


def test_total_keeps_term_gradients_and_detaches_accuracies() -> None:
    outputs = {k: v.requires_grad_() for k, v in _outputs(4, 5, seed=40).items()}
    result = EquiAVLoss(positive_in_denominator=False)(outputs)
    for key in ("loss", "inter", "intra_audio", "intra_visual"):
        assert result[key].requires_grad and result[key].dim() == 0, key
    for key in ("acc_inter", "acc_intra_audio", "acc_intra_visual"):
        assert not result[key].requires_grad and result[key].dim() == 0, key
    torch.testing.assert_close(
        result["intra_audio"],
        reference_intra(outputs["audio_equi"], outputs["audio_aug"], TAU, positive_in_denominator=False),
    )


# --------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("module", [IntraModalLoss(), IntraModalLoss(positive_in_denominator=False), InterModalLoss()])
def test_logits_are_float32_under_autocast(module: torch.nn.Module) -> None:
    x, y = _random(16, 32, seed=50, dtype=torch.float32), _random(16, 32, seed=51, dtype=torch.float32)
    exact = module(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = module(x, y)
        from_bf16 = module(x.bfloat16(), y.bfloat16())
    assert mixed.dtype == torch.float32 and from_bf16.dtype == torch.float32
    # bf16 logits would be off by ~1e-2 here.
    torch.testing.assert_close(mixed, exact, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(from_bf16, module(x.bfloat16().float(), y.bfloat16().float()), rtol=1e-6, atol=1e-6)
    half = module(x.half(), y.half())
    assert half.dtype == torch.float32 and torch.isfinite(half)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", [0.0, -0.07, math.nan, math.inf])
@pytest.mark.parametrize("cls", [IntraModalLoss, InterModalLoss, EquiAVLoss])
def test_bad_temperature_is_rejected(cls: type, bad: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        cls(temperature=bad)


def test_bad_constructor_arguments_are_rejected() -> None:
    with pytest.raises(TypeError, match="temperature"):
        IntraModalLoss(temperature="0.07")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="positive_in_denominator"):
        IntraModalLoss(positive_in_denominator=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight_audio"):
        EquiAVLoss(weight_audio=-1.0)
    with pytest.raises(ValueError, match="weight_inter"):
        EquiAVLoss(weight_inter=math.nan)
    with pytest.raises(ValueError, match="all 0"):
        EquiAVLoss(weight_inter=0, weight_audio=0, weight_visual=0)
    EquiAVLoss(weight_inter=0)  # one term switched off is a valid ablation


@pytest.mark.parametrize("module", [IntraModalLoss(), InterModalLoss()])
def test_bad_shapes_are_rejected(module: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match=r"same shape.*\(4, 8\).*\(5, 8\)"):
        module(torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"\[B, E\].*\(8,\)"):
        module(torch.randn(8), torch.randn(8))
    with pytest.raises(ValueError, match=r"B, E >= 1"):
        module(torch.randn(0, 8), torch.randn(0, 8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        module([[1.0]], torch.randn(1, 1))


def test_equimod_needs_two_clips() -> None:
    z = torch.randn(1, 4)
    with pytest.raises(ValueError, match="N >= 2"):
        IntraModalLoss(positive_in_denominator=False)(z, z)
    assert IntraModalLoss()(z, z).item() == pytest.approx(0.0, abs=1e-6)  # log(2*1 - 1)


def test_missing_model_output_is_named() -> None:
    outputs = _outputs(4, 5, seed=60)
    del outputs["visual_aug"]
    with pytest.raises(KeyError, match="visual_aug"):
        EquiAVLoss()(outputs)


# --------------------------------------------------------------------------- single-process helpers


def test_helpers_without_a_process_group() -> None:
    assert not eqdist.is_distributed()
    assert eqdist.world_size() == 1 and eqdist.rank() == 0
    x = torch.randn(3, 2, requires_grad=True)
    assert eqdist.gather_with_grad(x) is x
    gathered = eqdist.gather_no_grad(x)
    assert not gathered.requires_grad and gathered.data_ptr() == x.data_ptr()


# --------------------------------------------------------------------------- two processes (gloo)

WORLD = 2
LOCAL = 3
WIDTH = 5
TOTAL_WEIGHTS = {"weight_inter": 0.5, "weight_audio": 1.0, "weight_visual": 2.0}
SPAWN_TIMEOUT_S = 120


def _global_batch() -> dict[str, Tensor]:
    return _outputs(WORLD * LOCAL, WIDTH, seed=100)


def _rows(r: int) -> slice:
    return slice(r * LOCAL, (r + 1) * LOCAL)


def _loss_and_grads(loss: Tensor, inputs: list[Tensor]) -> dict[str, Any]:
    return {"loss": loss.detach(), "grads": list(torch.autograd.grad(loss, inputs))}


def _distributed_worker(r: int, workdir: str) -> None:
    """One rank: the losses on its half of the batch, the helpers; results to rank<r>.pt."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/rendezvous",
        rank=r,
        world_size=WORLD,
        timeout=timedelta(seconds=60),  # a stuck collective fails the test instead of hanging it
    )
    try:
        local = {k: v[_rows(r)].clone().requires_grad_() for k, v in _global_batch().items()}
        results: dict[str, Any] = {"rank": eqdist.rank(), "world_size": eqdist.world_size()}
        pair = [local["audio_equi"], local["audio_aug"]]
        # Every rank runs the same collectives in the same order (backward of a gather is one).
        for flag in (True, False):
            module = IntraModalLoss(positive_in_denominator=flag)
            loss, accuracy = module.loss_and_accuracy(*pair)
            results[f"intra_{flag}"] = {**_loss_and_grads(loss, pair), "acc": accuracy}
        pair = [local["audio_inter"], local["visual_inter"]]
        loss, accuracy = InterModalLoss().loss_and_accuracy(*pair)
        results["inter"] = {**_loss_and_grads(loss, pair), "acc": accuracy}
        total = EquiAVLoss(**TOTAL_WEIGHTS)(local)
        inputs = [local[k] for k in REQUIRED_OUTPUTS]
        results["total"] = {
            **_loss_and_grads(total["loss"], inputs),
            "terms": {k: v.detach() for k, v in total.items()},
        }

        # Helpers: rank order, and the summed backward the loss design relies on.
        results["gather_no_grad"] = eqdist.gather_no_grad(torch.full((2,), float(r)))
        x = torch.full((2,), float(r + 1), requires_grad=True)
        gathered = eqdist.gather_with_grad(x)
        results["gather_with_grad"] = gathered.detach()
        weights = (r + 1) * torch.arange(2 * WORLD, dtype=torch.float32)
        results["gather_with_grad_grad"] = torch.autograd.grad((gathered * weights).sum(), x)[0]
        try:
            eqdist.gather_no_grad(torch.zeros(r + 1, 2))
            results["unequal"] = None
        except ValueError as err:
            results["unequal"] = str(err)
        torch.save(results, Path(workdir) / f"rank{r}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("gloo")
    context = mp.start_processes(
        _distributed_worker, args=(str(workdir),), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    # join() re-raises a worker's exception (and terminates the other worker).
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            for process in context.processes:
                process.join(5)
            pytest.fail(f"the two gloo workers did not finish within {SPAWN_TIMEOUT_S} s")
    return [torch.load(workdir / f"rank{r}.pt") for r in range(WORLD)]


def _assert_matches_single_process(per_rank: list[dict[str, Any]], single: Tensor, inputs: list[Tensor]) -> None:
    """mean_r L_r == L, and grad_r / W == dL/dx on rank r's rows (DDP averages over ranks)."""
    torch.testing.assert_close(torch.stack([res["loss"] for res in per_rank]).mean(), single.detach())
    single_grads = torch.autograd.grad(single, inputs)
    for r, res in enumerate(per_rank):
        for got, want in zip(res["grads"], single_grads, strict=True):
            assert want[_rows(r)].abs().max() > 1e-3
            torch.testing.assert_close(got / WORLD, want[_rows(r)], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("flag", [True, False])
def test_distributed_intra_equals_single_process(two_ranks: list[dict[str, Any]], flag: bool) -> None:
    batch = {k: v.requires_grad_() for k, v in _global_batch().items()}
    pair = [batch["audio_equi"], batch["audio_aug"]]
    single, accuracy = IntraModalLoss(positive_in_denominator=flag).loss_and_accuracy(*pair)
    per_rank = [res[f"intra_{flag}"] for res in two_ranks]
    _assert_matches_single_process(per_rank, single, pair)
    assert torch.stack([res["acc"] for res in per_rank]).mean().item() == pytest.approx(accuracy.item())
    # The other rank's rows are really used: the loss of rank 0 is not its half-batch loss alone.
    alone = IntraModalLoss(positive_in_denominator=flag)(pair[0][_rows(0)], pair[1][_rows(0)])
    assert not math.isclose(per_rank[0]["loss"].item(), alone.item(), rel_tol=1e-6)


def test_distributed_inter_equals_single_process(two_ranks: list[dict[str, Any]]) -> None:
    batch = {k: v.requires_grad_() for k, v in _global_batch().items()}
    pair = [batch["audio_inter"], batch["visual_inter"]]
    single, accuracy = InterModalLoss().loss_and_accuracy(*pair)
    per_rank = [res["inter"] for res in two_ranks]
    _assert_matches_single_process(per_rank, single, pair)
    assert torch.stack([res["acc"] for res in per_rank]).mean().item() == pytest.approx(accuracy.item())
    alone = InterModalLoss()(pair[0][_rows(0)], pair[1][_rows(0)])
    assert not math.isclose(per_rank[0]["loss"].item(), alone.item(), rel_tol=1e-6)


def test_distributed_total_equals_single_process(two_ranks: list[dict[str, Any]]) -> None:
    batch = {k: v.requires_grad_() for k, v in _global_batch().items()}
    single = EquiAVLoss(**TOTAL_WEIGHTS)(batch)
    inputs = [batch[k] for k in REQUIRED_OUTPUTS]
    _assert_matches_single_process([res["total"] for res in two_ranks], single["loss"], inputs)
    for key, value in single.items():
        mean = torch.stack([res["total"]["terms"][key] for res in two_ranks]).mean()
        torch.testing.assert_close(mean, value.detach(), msg=key)


def test_distributed_helpers(two_ranks: list[dict[str, Any]]) -> None:
    for r, res in enumerate(two_ranks):
        assert (res["rank"], res["world_size"]) == (r, WORLD)
        torch.testing.assert_close(res["gather_no_grad"], torch.tensor([0.0, 0.0, 1.0, 1.0]))
        torch.testing.assert_close(res["gather_with_grad"], torch.tensor([1.0, 1.0, 2.0, 2.0]))
        # Rank r' weights gathered row k by (r'+1)*k: rank r's rows get sum_r' (r'+1) * [2r, 2r+1].
        expected = sum(rr + 1 for rr in range(WORLD)) * torch.tensor([2.0 * r, 2.0 * r + 1])
        torch.testing.assert_close(res["gather_with_grad_grad"], expected)
        # Unequal local shapes: every rank raises (none is left hanging), naming the shapes.
        assert res["unequal"] is not None and "[(1, 2), (2, 2)]" in res["unequal"]
