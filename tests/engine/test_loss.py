"""chunked_cross_entropy against the plain full-logits cross-entropy: values and gradients."""
import pytest
import torch

from engine.loss import IGNORE_INDEX, chunked_cross_entropy, cross_entropy_reference


def _case(dtype, B=3, T=9, C=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g).to(dtype)
    weight = (torch.randn(V, C, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt part without loss
    labels[2, -2:] = IGNORE_INDEX
    return hidden, weight, labels


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [4, 7, 2048])
@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_loss_and_gradients_match_the_plain_loss(dtype, tol, chunk, train_head):
    hidden, weight, labels = _case(dtype)
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    grads = {}
    for name in ("chunked", "plain"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(train_head)
        if name == "chunked":
            total, count = chunked_cross_entropy(h, w, labels, chunk_size=chunk)
            assert count == n
            loss = total / count
        else:
            loss = cross_entropy_reference(h, w, labels)
        (loss * 3.0).backward()  # a non-unit upstream gradient
        grads[name] = (loss.detach(), h.grad, w.grad)
    (lc, hc, wc), (lp, hp, wp) = grads["chunked"], grads["plain"]
    assert abs(lc.item() - lp.item()) <= tol * abs(lp.item())
    assert (hc.float() - hp.float()).abs().max() <= tol * hp.float().abs().max()
    if train_head:
        assert (wc.float() - wp.float()).abs().max() <= tol * wp.float().abs().max()
    else:
        assert wc is None and wp is None
    assert hc[0, :3].abs().sum() == 0  # positions predicting ignored labels get no gradient


def test_chunked_loss_without_grad():
    hidden, weight, labels = _case(torch.float32)
    with torch.no_grad():
        total, n = chunked_cross_entropy(hidden, weight, labels, chunk_size=5)
    assert abs((total / n).item() - cross_entropy_reference(hidden, weight, labels).item()) < 1e-5
