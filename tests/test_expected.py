"""`expected` (Expected Attention) against a direct computation on known inputs."""
from __future__ import annotations

import numpy as np
import pytest

from edgekv.methods import KVView, get_method
from edgekv.methods.expected import rotate, unrotate


@pytest.mark.parametrize("neox", [True, False])
def test_unrotate_inverts_rope(neox):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 5, 16))
    pos = np.array([7, 100, 1000, 5000, 9999])
    np.testing.assert_allclose(unrotate(rotate(q, pos, 1e4, neox), pos, 1e4, neox), q, atol=1e-9)
    assert not np.allclose(rotate(q, pos, 1e4, neox), q)


@pytest.mark.parametrize("neox", [True, False])
def test_one_query_one_future_position_is_its_attention_one_step_later(neox):
    """W = 1, no covariance, one future position: the expected attention is the softmax of the same
    (pre-RoPE) query rotated to the next position, against the cached keys."""
    rng = np.random.default_rng(1)
    L, Hk, H, T, d = 2, 2, 4, 30, 8
    keys = rng.standard_normal((L, Hk, T, d)).astype(np.float32)
    values = np.ones((L, Hk, T, d), np.float32)
    q_pre = rng.standard_normal((L, H, 1, d))
    pos = np.arange(T) + 50
    q_post = rotate(q_pre, pos[-1:], 1e4, neox).astype(np.float32)
    view = KVView(keys, values, np.ones(T, bool), queries=q_post, positions=pos, rope_base=1e4, rope_neox=neox)
    m = get_method("expected", n_future=1, n_sink=0, use_covariance=False, use_vnorm=False)
    got = m.score(view)
    q_next = rotate(q_pre, pos[-1:] + 1, 1e4, neox)[:, :, 0]          # [L, H, d]
    logits = np.einsum("lhd,lhtd->lht", q_next, np.repeat(keys, H // Hk, axis=1)) * view.scale
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = p.reshape(L, Hk, H // Hk, T).mean(axis=2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_covariance_and_vnorm_change_the_scores():
    rng = np.random.default_rng(2)
    L, Hk, H, T, d, W = 1, 1, 2, 40, 8, 6
    keys = rng.standard_normal((L, Hk, T, d)).astype(np.float32)
    values = rng.standard_normal((L, Hk, T, d)).astype(np.float32)
    q = rng.standard_normal((L, H, W, d)).astype(np.float32)
    view = KVView(keys, values, np.ones(T, bool), queries=q, rope_base=1e4)
    plain = get_method("expected", use_covariance=False, use_vnorm=False, n_sink=0).score(view)
    cov = get_method("expected", use_vnorm=False, n_sink=0).score(view)
    vn = get_method("expected", use_covariance=False, n_sink=0).score(view)
    assert not np.allclose(plain, cov)
    np.testing.assert_allclose(vn, plain * np.linalg.norm(values, axis=-1), rtol=1e-6)
    sink = get_method("expected", n_sink=3).score(view)
    assert (sink[..., :3] > sink[..., 3:].max()).all()


def test_covariance_term_matches_the_gaussian_formula():
    """log E[exp(s q.k)] for q ~ N(mu', S') = s k.mu' + s^2/2 k^T S' k, S' = Rbar S Rbar^T."""
    from edgekv.methods.expected import _rotate_matrix, mean_rotation

    rng = np.random.default_rng(3)
    L, Hk, H, T, d, W = 1, 1, 1, 25, 8, 5
    keys = rng.standard_normal((L, Hk, T, d)).astype(np.float32)
    q = rng.standard_normal((L, H, W, d)).astype(np.float32)
    pos = np.arange(T) + 10
    view = KVView(keys, np.ones_like(keys), np.ones(T, bool), queries=q, positions=pos, rope_base=1e4)
    got = get_method("expected", n_sink=0, use_vnorm=False, n_future=7).score(view)[0, 0]
    q0 = unrotate(q, pos[-W:], 1e4, True)[0, 0]
    R = _rotate_matrix(*mean_rotation(int(pos[-1]) + 1, 7, d, 1e4), d, True)
    mu, S = R @ q0.mean(0), R @ np.cov(q0.T) @ R.T
    k, s = keys[0, 0].astype(np.float64), view.scale
    z = s * k @ mu + 0.5 * s * s * np.einsum("td,de,te->t", k, S, k)
    want = np.exp(z - z.max())
    np.testing.assert_allclose(got, want / want.sum(), rtol=1e-4, atol=1e-7)
