"""Forward-error bounds for comparing fp32 feature maps computed by different code paths (einsum
against bmm, oneDNN's GELU against ATen's or the C++ step's rational erf, psi's factors folded or
not). A sum's rounding error scales with the magnitude of its terms, not of its value: a feature
that cancels to ~0 is known only to that absolute error, so its log is not comparable at a fixed
tolerance on every CPU. Tolerances here follow from that, not from what one machine printed."""

from __future__ import annotations

import torch

EPS32 = torch.finfo(torch.float32).eps
GELU_SLOPE = 1.13  # max |GELU'(x)| (1.129 at x = 1.41)
GELU_ULPS = 8  # an implementation's GELU (erf or its approximation): within 8 eps of |x| + |y|


def _gelu_error(a: torch.Tensor, da: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU of a value known to within ``da``: (value, its fp32 forward-error bound)."""
    y = torch.nn.functional.gelu(a)
    return y, GELU_SLOPE * da + GELU_ULPS * EPS32 * (y.abs() + a.abs())


def _product_error(x, dx, w):
    """x [B,h,S,n] (error dx) times w [h,n,m] in fp32: (value, forward-error bound), the
    textbook bound (n + 2) eps sum|x||w| for the rounding plus dx |w| for the inputs' error."""
    prod = torch.einsum("bhsn,hnm->bhsm", x, w)
    mag = torch.einsum("bhsn,hnm->bhsm", x.abs(), w.abs())
    return prod, (x.shape[-1] + 2) * EPS32 * mag + torch.einsum("bhsn,hnm->bhsm", dx, w.abs())


def mlp_with_bound(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor):
    """GELU(GELU(x w1) w2) in fp64, x [B,h,S,d], w1 [h,d,hid], w2 [h,hid,R] -> (value, bound on
    the error of any fp32 evaluation: any order of the sums, any GELU within GELU_ULPS)."""
    x, w1, w2 = x.double(), w1.double(), w2.double()
    a1, da1 = _product_error(x, torch.zeros_like(x), w1)
    h, dh = _gelu_error(a1, da1)
    a2, da2 = _product_error(h, dh, w2)
    return _gelu_error(a2, da2)


def fold_with_bound(y: torch.Tensor, dy: torch.Tensor, m: torch.Tensor, m_abs: torch.Tensor):
    """|y M| for y [B,h,S,R] (error dy) and M [h,R,R] (``m_abs`` bounds |M| entrywise and its
    fold's rounding, 4 eps each): (value, bound)."""
    m = m.double()
    out, dout = _product_error(y, dy, m)
    return out.abs(), dout + 4 * EPS32 * torch.einsum("bhsn,hnm->bhsm", y.abs(), m_abs.double())


def learned_features_with_bound(net, x: torch.Tensor, query: bool):
    """The learned phi (query) or psi of x [B,h,S,d] (:class:`lessctl.less.kernels.LearnedKernels`
    ``net``) in fp64, with a bound on the error of an fp32 evaluation, psi's factors folded or not
    (module doc: the log of a feature within its bound of 0 is unknown)."""
    w = {n: getattr(net, n).detach().double() for n in ("W1q", "W2q", "W1k", "W2k", "W_int")}
    if query:
        y, dy = mlp_with_bound(x, w["W1q"], w["W2q"])
        return y.abs(), dy
    y, dy = mlp_with_bound(x, w["W1k"], w["W2k"])
    s1, s2 = net.s1.detach().double().abs(), net.s2.detach().double()
    eye = torch.eye(s1.shape[-1], dtype=torch.float64)
    m = s1[:, :, None] * (eye + w["W_int"] * s2[:, None, :])  # psi = |y M| (frozen.py)
    m_abs = s1[:, :, None] * (eye + w["W_int"].abs() * s2.abs()[:, None, :])
    return fold_with_bound(y, dy, m, m_abs)


def assert_features_within(log_features: torch.Tensor, want: torch.Tensor, bound: torch.Tensor):
    """exp(log_features) (fp32) equals the fp64 ``want`` within ``bound`` plus exp's own
    rounding of a rounded log (relative 2 eps (|log| + 1))."""
    got = log_features.double().exp()
    rounding = 2 * EPS32 * (log_features.double().abs() + 1) * want  # NaN: log 0 = -inf, exp 0
    slack = bound + rounding.nan_to_num(nan=0.0)
    excess = (got - want).abs() - slack
    worst = int(excess.argmax())
    assert excess.max() <= 0, (
        f"feature {got.flatten()[worst]:.6e} vs {want.flatten()[worst]:.6e}: error "
        f"{(got - want).abs().flatten()[worst]:.3e} > bound {slack.flatten()[worst]:.3e}"
    )
