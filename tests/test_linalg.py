"""The shared closed-form solver against numpy's least squares, its low-rank form, residuals and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptsmith.linalg import SingularSystemError, regenerating_embeddings, solve_ridge, weighted_gram

D_IN = 12


def _problem(seed=0, k=4, m=5, d_outs=(7, 9, 16)):
    g = torch.Generator().manual_seed(seed)
    weights = {f"p{i}": torch.randn(d, D_IN, generator=g, dtype=torch.float64) for i, d in enumerate(d_outs)}
    c = torch.randn(k, D_IN, generator=g, dtype=torch.float64)
    t = torch.randn(k, D_IN, generator=g, dtype=torch.float64)
    p = torch.randn(m, D_IN, generator=g, dtype=torch.float64)
    a = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.5
    return weights, c, t, p, a, b


def _lstsq(w_old, c, v_star, p, a, b, lam):
    """Stack the weighted rows of all three terms and solve ||X W^T - Y|| with numpy."""
    rows_x = [np.sqrt(a)[:, None] * c]
    rows_y = [np.sqrt(a)[:, None] * v_star]
    if p is not None:
        rows_x.append(np.sqrt(b)[:, None] * p)
        rows_y.append(np.sqrt(b)[:, None] * (p @ w_old.T))
    if lam > 0:
        rows_x.append(np.sqrt(lam) * np.eye(w_old.shape[1]))
        rows_y.append(np.sqrt(lam) * w_old.T)
    solution, *_ = np.linalg.lstsq(np.concatenate(rows_x), np.concatenate(rows_y), rcond=None)
    return solution.T


@pytest.mark.parametrize("lam", [0.5, 1e-3])
def test_input_space_targets_match_numpy_lstsq(lam):
    weights, c, t, p, a, b = _problem()
    sol = solve_ridge(weights, c, t, edit_weights=a, preserve_inputs=p, preserve_weights=b, lam=lam, out_dtype=torch.float64)
    for name, w in weights.items():
        v_star = (t @ w.T).numpy()
        expected = _lstsq(w.numpy(), c.numpy(), v_star, p.numpy(), a.numpy(), b.numpy(), lam)
        np.testing.assert_allclose((w + sol.dense(name)).numpy(), expected, rtol=1e-8, atol=1e-9)


def test_explicit_targets_match_numpy_lstsq():
    weights, c, _, p, a, b = _problem(seed=1)
    g = torch.Generator().manual_seed(5)
    targets = {name: torch.randn(c.shape[0], w.shape[0], generator=g, dtype=torch.float64) for name, w in weights.items()}
    sol = solve_ridge(weights, c, targets, edit_weights=a, preserve_inputs=p, preserve_weights=b, lam=0.2, out_dtype=torch.float64)
    for name, w in weights.items():
        expected = _lstsq(w.numpy(), c.numpy(), targets[name].numpy(), p.numpy(), a.numpy(), b.numpy(), 0.2)
        np.testing.assert_allclose((w + sol.dense(name)).numpy(), expected, rtol=1e-8, atol=1e-9)


def test_lam_zero_with_spanning_preserve_set_matches_lstsq():
    weights, c, t, _, a, _ = _problem(seed=2)
    p = torch.randn(3 * D_IN, D_IN, dtype=torch.float64)
    sol = solve_ridge(weights, c, t, edit_weights=a, preserve_inputs=p, lam=0.0, out_dtype=torch.float64)
    for name, w in weights.items():
        expected = _lstsq(w.numpy(), c.numpy(), (t @ w.T).numpy(), p.numpy(), a.numpy(), np.ones(len(p)), 0.0)
        np.testing.assert_allclose((w + sol.dense(name)).numpy(), expected, rtol=1e-7, atol=1e-8)


def test_delta_is_exactly_low_rank_and_factors_reproduce_it():
    weights, c, t, p, a, b = _problem(k=3)
    sol = solve_ridge(weights, c, t, edit_weights=a, preserve_inputs=p, preserve_weights=b, lam=0.5, out_dtype=torch.float64)
    assert sol.rank == 3
    for name, w in weights.items():
        up, down = sol.deltas[name]
        assert up.shape == (w.shape[0], 3) and down.shape == (3, D_IN)
        assert torch.linalg.matrix_rank(up @ down) <= 3


def test_dense_when_rank_reaches_the_smaller_dimension():
    weights, c, t, *_ = _problem(k=8, d_outs=(7, 16))
    sol = solve_ridge(weights, c, t, lam=0.5)
    assert not isinstance(sol.deltas["p0"], tuple)  # rank 8 >= min(7, 12)
    assert isinstance(sol.deltas["p1"], tuple)
    forced = solve_ridge(weights, c, t, lam=0.5, low_rank=True)
    assert isinstance(forced.deltas["p0"], tuple)
    torch.testing.assert_close(forced.dense("p0").float(), sol.deltas["p0"], rtol=1e-5, atol=1e-6)


def test_recorded_residuals_equal_the_measured_ones():
    weights, c, t, p, a, b = _problem(seed=3)
    sol = solve_ridge(weights, c, t, edit_weights=a, preserve_inputs=p, preserve_weights=b, lam=0.5, out_dtype=torch.float64)
    sb = b.sqrt()[:, None]
    for name, w in weights.items():
        w_new = w + sol.dense(name)
        v_star = t @ w.T
        edit = torch.linalg.norm(c @ w_new.T - v_star) / torch.linalg.norm(v_star - c @ w.T)
        drift = torch.linalg.norm(sb * (p @ (w_new - w).T)) / torch.linalg.norm(sb * (p @ w.T))
        assert sol.edit_residual[name] == pytest.approx(float(edit), rel=1e-6)
        assert sol.preserve_residual[name] == pytest.approx(float(drift), rel=1e-6)
        assert 0 < sol.edit_residual[name] < 1
    metrics = sol.metrics()
    assert metrics["condition_number"] == pytest.approx(float(torch.linalg.cond(
        weighted_gram(c, a) + weighted_gram(p, b) + 0.5 * torch.eye(D_IN, dtype=torch.float64))), rel=1e-6)
    assert set(metrics["edit_residual"]) == set(weights)


def test_prior_gram_is_equivalent_to_preserve_vectors():
    weights, c, t, p, a, b = _problem(seed=4)
    by_vectors = solve_ridge(weights, c, t, preserve_inputs=p, preserve_weights=b, lam=0.3, out_dtype=torch.float64)
    by_gram = solve_ridge(weights, c, t, preserve_gram=weighted_gram(p, b), lam=0.3, out_dtype=torch.float64)
    for name in weights:
        torch.testing.assert_close(by_gram.dense(name), by_vectors.dense(name))
        assert by_gram.preserve_residual[name] == pytest.approx(by_vectors.preserve_residual[name], rel=1e-8)


def test_chunked_stacking_and_float32_agree():
    weights, c, t, p, a, b = _problem(seed=5)
    whole = solve_ridge(weights, c, t, preserve_inputs=p, lam=0.5, out_dtype=torch.float64)
    chunked = solve_ridge(weights, c, t, preserve_inputs=p, lam=0.5, out_dtype=torch.float64, chunk_bytes=1)
    single = solve_ridge({n: w.float() for n, w in weights.items()}, c.float(), t.float(), preserve_inputs=p.float(),
                         lam=0.5, dtype=torch.float32)
    for name in weights:
        torch.testing.assert_close(chunked.dense(name), whole.dense(name))
        torch.testing.assert_close(single.dense(name).double(), whole.dense(name), rtol=1e-4, atol=1e-5)
        assert chunked.edit_residual[name] == pytest.approx(whole.edit_residual[name])


def test_half_precision_weights_are_solved_in_float64_and_not_mutated():
    weights, c, t, *_ = _problem(seed=6)
    half = {n: w.half() for n, w in weights.items()}
    before = {n: w.clone() for n, w in half.items()}
    sol = solve_ridge(half, c.half(), t.half(), lam=0.5)
    assert sol.dtype == torch.float64
    for name in half:
        assert torch.equal(half[name], before[name])
    with pytest.raises(ValueError, match="never half"):
        solve_ridge(weights, c, t, dtype=torch.float16)


def test_more_edit_vectors_than_d_in_with_lam_zero_is_a_clear_error():
    weights, *_ = _problem()
    c = torch.randn(D_IN + 3, D_IN, dtype=torch.float64)
    with pytest.raises(SingularSystemError, match=r"lam > 0.*preserve"):
        solve_ridge(weights, c, torch.zeros_like(c), lam=0.0)
    # the fixes the message names both work
    solve_ridge(weights, c, torch.zeros_like(c), lam=0.5)
    solve_ridge(weights, c, torch.zeros_like(c), lam=0.0, preserve_inputs=torch.randn(2 * D_IN, D_IN, dtype=torch.float64))


def test_too_few_vectors_with_lam_zero_is_a_clear_error():
    weights, c, t, p, *_ = _problem()
    with pytest.raises(SingularSystemError, match=r"span only 9 of the d_in = 12.*lam > 0.*preserve"):
        solve_ridge(weights, c, t, preserve_inputs=p, lam=0.0)


def test_bad_shapes_and_weights_are_reported():
    weights, c, t, p, *_ = _problem()
    with pytest.raises(ValueError, match=r"edit_inputs has shape \(4, 5\)"):
        solve_ridge(weights, c[:, :5], t)
    with pytest.raises(ValueError, match="one target per edit vector"):
        solve_ridge(weights, c, t[:2])
    with pytest.raises(ValueError, match="edit_weights must be finite and >= 0"):
        solve_ridge(weights, c, t, edit_weights=-1.0)
    with pytest.raises(ValueError, match="0 rows"):
        solve_ridge(weights, c[:0], t[:0])
    with pytest.raises(ValueError, match="lam must be"):
        solve_ridge(weights, c, t, lam=-1)


def test_regenerating_embeddings_match_the_formula():
    weights, c, t, *_ = _problem(seed=7)
    sol = solve_ridge(weights, c, t, lam=0.5, out_dtype=torch.float64)
    regen = regenerating_embeddings(weights, sol.deltas, c, lam=0.1)
    edited = {n: w + sol.dense(n) for n, w in weights.items()}
    lhs = 0.1 * torch.eye(D_IN, dtype=torch.float64) + sum(e.T @ e for e in edited.values())
    rhs = sum(edited[n].T @ weights[n] for n in weights)
    torch.testing.assert_close(regen, torch.linalg.solve(lhs, rhs @ c.T).T)
    # without an edit the regenerating embedding of c is (almost) c itself
    torch.testing.assert_close(regenerating_embeddings(weights, {}, c, lam=1e-9), c, rtol=1e-6, atol=1e-6)


def test_float32_weights_use_float32_products_without_losing_accuracy():
    weights, c, t, p, a, b = _problem(seed=8, d_outs=(40, 64))
    exact = solve_ridge(weights, c, t, preserve_inputs=p, lam=0.5, out_dtype=torch.float64)
    fast = solve_ridge({n: w.float() for n, w in weights.items()}, c, t, preserve_inputs=p, lam=0.5)
    for name, w in weights.items():
        w32 = w.float().double()  # the same weights as stored in float32
        ref = solve_ridge({name: w32}, c, t, preserve_inputs=p, lam=0.5, out_dtype=torch.float64).dense(name)
        err = torch.linalg.norm(fast.dense(name).double() - ref) / torch.linalg.norm(ref)
        assert err < 1e-5
        assert fast.edit_residual[name] == pytest.approx(exact.edit_residual[name], rel=1e-4)


def _kkt(w_old, c, v, gram, lam):
    """min tr((W-W0) M (W-W0)^T) s.t. W c^T = v^T via the KKT system, in numpy."""
    d, k = c.shape[1], c.shape[0]
    m = gram + lam * np.eye(d)
    kkt = np.block([[2 * m, c.T], [c, np.zeros((k, k))]])
    rhs = np.concatenate([2 * m @ w_old.T, v])
    return np.linalg.solve(kkt, rhs)[:d].T


def test_constrained_merge_solve_matches_the_kkt_system_and_meets_every_constraint():
    from conceptsmith.linalg import solve_constrained

    g = torch.Generator().manual_seed(0)
    d, k = 12, 4
    weights = {"a": torch.randn(7, d, generator=g, dtype=torch.float64), "b": torch.randn(5, d, generator=g, dtype=torch.float64)}
    c = torch.randn(k, d, generator=g, dtype=torch.float64)
    v = {name: torch.randn(k, w.shape[0], generator=g, dtype=torch.float64) for name, w in weights.items()}
    reg = torch.randn(30, d, generator=g, dtype=torch.float64)
    gram = reg.T @ reg
    sol = solve_constrained(weights, c, v, preserve_gram=gram, lam=0.1)
    for name, w in weights.items():
        expected = _kkt(w.numpy(), c.numpy(), v[name].numpy(), gram.numpy(), 0.1)
        new = w + sol.dense(name)
        np.testing.assert_allclose(new.numpy(), expected, rtol=1e-5, atol=1e-5)  # the update is stored in float32
        torch.testing.assert_close(new @ c.T, v[name].T, rtol=1e-5, atol=1e-5)
        assert sol.edit_residual[name] < 1e-8 and torch.linalg.matrix_rank(sol.dense(name)) <= k
    # a repeated constraint row (same token in two prompts) changes nothing: the pseudo-inverse drops it
    again = solve_constrained(weights, torch.cat([c, c[:1]]), {n: torch.cat([t, t[:1]]) for n, t in v.items()},
                              preserve_gram=gram, lam=0.1)
    torch.testing.assert_close(again.dense("a"), sol.dense("a"))
    assert again.metrics()["constraint_rank"] == k and again.metrics()["solver"] == "constrained-pinv"
    with pytest.raises(SingularSystemError, match="not positive definite"):
        solve_constrained(weights, c, v, preserve_gram=torch.zeros(d, d, dtype=torch.float64), lam=0.0)


def test_float64_solves_of_mps_weights_run_on_cpu_copies() -> None:
    from types import SimpleNamespace

    from conceptsmith.linalg import _float64_capable

    on_cpu = torch.ones(2, 3)
    mps_like = SimpleNamespace(device=torch.device("mps"), cpu=lambda: on_cpu)  # MPS has no float64
    assert _float64_capable({"k": mps_like}, torch.float64)["k"] is on_cpu
    assert _float64_capable({"k": mps_like}, torch.float32)["k"] is mps_like  # float32 solves stay on the device
    weights = {"k": on_cpu}
    assert _float64_capable(weights, torch.float64) is weights
