"""Router semantics against a numpy reference: selection bias, groups, HF remote-code switch."""

import mlx.core as mx
import numpy as np
import pytest

from kimi_mlx.model.moe import route


def np_route(x, w, bias, k, n_group, topk_group, renorm, scale, bias_in_weights):
    s = 1 / (1 + np.exp(-(x @ w.T)))
    choice = s + bias
    N, E = choice.shape
    if n_group > 1:
        g = np.sort(choice.reshape(N, n_group, -1), -1)[..., -2:].sum(-1)
        keep = np.argsort(-g, -1)[:, :topk_group]
        mask = np.zeros((N, n_group), bool)
        np.put_along_axis(mask, keep, True, -1)
        choice = np.where(np.repeat(mask, E // n_group, -1), choice, -np.inf)
    idx = np.argsort(-choice, -1)[:, :k]
    wts = np.take_along_axis(choice if bias_in_weights else s, idx, -1)
    if renorm:
        wts = wts / (wts.sum(-1, keepdims=True) + 1e-20)
    return idx, wts * scale


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2), (8, 3)])
@pytest.mark.parametrize("bias_in_weights", [False, True])
@pytest.mark.parametrize("renorm", [False, True])
def test_route_matches_numpy(n_group, topk_group, bias_in_weights, renorm):
    rng = np.random.default_rng(n_group * 10 + topk_group)
    x = rng.standard_normal((37, 16)).astype(np.float32)
    w = rng.standard_normal((32, 16)).astype(np.float32) * 0.5
    bias = rng.standard_normal(32).astype(np.float32) * 0.3
    opts = dict(top_k=4, n_group=n_group, topk_group=topk_group, renormalize=renorm, scaling=2.446,
                bias_in_weights=bias_in_weights)
    idx, wts = route(mx.array(x), mx.array(w), mx.array(bias), **opts)
    ref_idx, ref_w = np_route(x, w, bias, 4, n_group, topk_group, renorm, 2.446, bias_in_weights)
    order = np.argsort(np.array(idx), -1)
    got_idx = np.take_along_axis(np.array(idx), order, -1)
    got_w = np.take_along_axis(np.array(wts), order, -1)
    ref_order = np.argsort(ref_idx, -1)
    assert np.array_equal(got_idx, np.take_along_axis(ref_idx, ref_order, -1))
    np.testing.assert_allclose(got_w, np.take_along_axis(ref_w, ref_order, -1), rtol=1e-5, atol=1e-6)


def test_bias_changes_weights_only_in_hf_mode():
    rng = np.random.default_rng(0)
    x, w = mx.array(rng.standard_normal((5, 8)).astype(np.float32)), mx.array(rng.standard_normal((16, 8)).astype(np.float32))
    bias = mx.full((16,), 0.25)
    opts = dict(top_k=3, n_group=1, topk_group=1, renormalize=False, scaling=1.0)
    _, plain = route(x, w, bias, **opts)
    _, hf = route(x, w, bias, bias_in_weights=True, **opts)
    np.testing.assert_allclose(np.array(hf) - np.array(plain), 0.25, rtol=1e-5)
