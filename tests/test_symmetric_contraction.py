"""Tests of the symmetric contraction (MACE's many-body product basis), all in float64."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from e3nn import o3

from potentials.errors import PotentialsError
from potentials.nn.symmetric_contraction import SymmetricContraction, symmetric_basis
from potentials.nn.tp.base import from_channels_last, to_channels_last

F64 = torch.float64


def _counts(level) -> dict[str, int]:
    return {str(ir): u.shape[0] for ir, u in level.items()}


def _module(irreps_in, irreps_out, correlation, num_elements=3, seed=0) -> SymmetricContraction:
    torch.manual_seed(seed)
    return SymmetricContraction(irreps_in, irreps_out, correlation, num_elements).to(F64)


def _inputs(m: SymmetricContraction, n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, m.irreps_in.dim, dtype=F64, generator=g)
    species = torch.randint(0, m.num_elements, (n,), generator=g)
    return a, species


def _random_o3(seed: int, inversion: bool) -> torch.Tensor:
    torch.manual_seed(seed)
    r = o3.rand_matrix(dtype=F64)
    return -r if inversion else r


def _wigner_d(l: int, r: torch.Tensor) -> torch.Tensor:
    """float64-exact D^l(R) for a rotation R (e3nn convention D^1(R) = R), by coupling with ``o3.wigner_3j``.

    e3nn 0.6's ``Irreps.D_from_matrix`` builds its generators in the default dtype (float32) and is only
    accurate to ~1e-6 even in float64, too coarse for a 1e-10 equivariance test; the invariance of the
    (float64-exact) 3j symbols gives D^L = (2L+1) W^T (D^{L-1} ⊗ D^1) W with W = wigner_3j(L-1, 1, L).
    """
    d = [torch.ones(1, 1, dtype=F64), r]
    for big_l in range(2, l + 1):
        w = o3.wigner_3j(big_l - 1, 1, big_l, dtype=F64).reshape(-1, 2 * big_l + 1)
        d.append((2 * big_l + 1) * w.T @ torch.kron(d[big_l - 1], r) @ w)
    return d[l]


def _irrep_d(ir: o3.Irrep, g: torch.Tensor) -> torch.Tensor:
    """D of the irrep for an O(3) element ``g`` (rotation times ±1)."""
    det = torch.det(g)
    sign = ir.p if det < 0 else 1
    return sign * _wigner_d(ir.l, g * det.sign())


def _irreps_d(irreps: o3.Irreps, g: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*[_irrep_d(ir, g) for mul, ir in irreps for _ in range(mul)])


def test_exact_wigner_d_matches_e3nn_convention():
    irreps = o3.Irreps("0e+1o+1e+2e+2o+3o+3e")
    for inversion in (False, True):
        g = _random_o3(7, inversion)
        assert torch.allclose(_irreps_d(irreps, g), irreps.D_from_matrix(g), atol=1e-5)
        d = _irreps_d(irreps, g)
        assert torch.allclose(d @ d.T, torch.eye(irreps.dim, dtype=F64), atol=1e-13)


def _reachable(channel_irreps: str, correlation: int) -> o3.Irreps:
    basis = symmetric_basis(channel_irreps, correlation)
    return o3.Irreps(sorted({ir for lev in basis.values() for ir in lev if ir.l <= 3}))


# ----------------------------------------------------------------------------------------- the U basis


def test_path_counts_lmax3():
    basis = symmetric_basis("0e+1o+2e+3o", 3, "0e+1o+2e")
    assert _counts(basis[1]) == {"0e": 1, "1o": 1, "2e": 1}
    assert _counts(basis[2]) == {"0e": 4, "1o": 3, "2e": 5}
    assert _counts(basis[3]) == {"0e": 8, "1o": 12, "2e": 14}
    m = SymmetricContraction("2x0e+2x1o+2x2e+2x3o", "2x0e+2x1o+2x2e", 3, 2)
    assert m.paths("0e") == {1: 1, 2: 4, 3: 8}
    assert m.paths("1o") == {1: 1, 2: 3, 3: 12}
    assert m.weights[1].shape == (2, 1 + 3 + 12, 2)


def test_path_counts_match_e3nn_reduced_tensor_products():
    ours = symmetric_basis("0e+1o", 3)
    assert o3.Irreps([(u.shape[0], ir) for ir, u in sorted(ours[3].items())]) == o3.Irreps("2x0e+2x1o+1x2e+1x3o")
    # same spans as e3nn's (float32) construction, block by block
    rtp = o3.ReducedTensorProducts("ijk=jik=ikj", i="0e+1o")
    q = rtp.change_of_basis.to(F64)  # [20, 4, 4, 4]
    for (mul, ir), s in zip(rtp.irreps_out, rtp.irreps_out.slices()):
        theirs = q[s].reshape(mul, ir.dim, -1).transpose(0, 1)  # [2L+1, mul, 64]
        mine = ours[3][ir].reshape(-1, ir.dim, 64).transpose(0, 1)  # [2L+1, P, 64]
        for t, u in zip(theirs, mine):  # per component M: their vectors lie in our span
            proj = t @ u.T @ torch.linalg.pinv(u @ u.T) @ u
            assert torch.allclose(proj, t, atol=1e-5 * t.abs().max())


@pytest.mark.parametrize("irreps", ["0e+1o+2e", "0e+1e+2o"])
def test_basis_complete_orthogonal_symmetric(irreps):
    d = o3.Irreps(irreps).dim
    basis = symmetric_basis(irreps, 3)
    for nu, level in basis.items():
        # complete: the irreps found fill Sym^ν of the channel space
        assert sum(u.shape[0] * u.shape[1] for u in level.values()) == math.comb(d + nu - 1, nu)
        for ir, u in level.items():
            flat = u.reshape(u.shape[0], -1)
            assert torch.allclose(flat @ flat.T, ir.dim * torch.eye(u.shape[0], dtype=F64), atol=1e-12)
            for perm in itertools.permutations(range(2, nu + 2)):
                assert torch.allclose(u.permute(0, 1, *perm), u, atol=1e-14)


@pytest.mark.parametrize("inversion", [False, True])
def test_basis_equivariant(inversion):
    irreps = o3.Irreps("0e+1o+2e")
    r = _random_o3(3, inversion)
    d_in = _irreps_d(irreps, r)
    for nu, level in symmetric_basis(str(irreps), 3).items():
        for ir, u in level.items():
            rotated = u
            for axis in range(2, nu + 2):  # U(D x, …, D x)
                rotated = torch.movedim(torch.tensordot(rotated, d_in, dims=([axis], [0])), -1, axis)
            expected = torch.einsum("Mm,pm...->pM...", _irrep_d(ir, r), u)
            assert (rotated - expected).abs().max() <= 1e-12, (nu, ir)


def test_basis_independent_of_targets():
    full = symmetric_basis("0e+1o+2e", 3)
    for targets in ["0e", "1o+2e", "0e+1o+2e+3o"]:
        part = symmetric_basis("0e+1o+2e", 3, targets)
        for nu, level in part.items():
            assert set(level) <= {ir for _, ir in o3.Irreps(targets)}
            for ir, u in level.items():
                assert torch.equal(u, full[nu][ir])


# ------------------------------------------------------------------------------------------ the module


def _dense_reference(m: SymmetricContraction, a: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
    """Straight from the definition: Σ_ν Σ_η W[z,η,c] Σ_k U[η,M,k1..kν] Π A[c,k_i] (full U, no compression)."""
    x = to_channels_last(a, m.irreps_in)
    channel_irreps = "+".join(str(ir) for _, ir in m.irreps_in)
    basis = symmetric_basis(channel_irreps, m.correlation)
    letters = "ijkl"
    outs = []
    for (_, ir), w, slices in zip(m.irreps_out, m.weights, m.path_slices):
        out = 0
        for nu, s in slices.items():
            ks = letters[:nu]
            prod = torch.einsum(",".join(f"nc{k}" for k in ks) + "->nc" + ks, *([x] * nu))
            b = torch.einsum(f"pM{ks},nc{ks}->ncpM", basis[nu][ir], prod)
            out = out + torch.einsum("ncpM,npc->ncM", b, w[species][:, s])
        outs.append(out.reshape(a.shape[0], -1))
    return torch.cat(outs, dim=-1)


def test_matches_dense_reference():
    m = _module("3x0e+3x1o+3x2e", "3x0e+3x1o+3x2e+3x2o", 3)
    a, species = _inputs(m, 7)
    with torch.no_grad():
        ref = _dense_reference(m, a, species)
        assert torch.allclose(m(a, species), ref, atol=1e-12 * float(ref.abs().max()))


@pytest.mark.parametrize("correlation", [1, 2, 3])
@pytest.mark.parametrize("channel_irreps", ["0e+1o+2e", "0e+1e+2o+1o"])
@pytest.mark.parametrize("inversion", [False, True])
def test_equivariance(correlation, channel_irreps, inversion):
    mul = 3
    irreps_in = o3.Irreps([(mul, ir) for _, ir in o3.Irreps(channel_irreps)])
    irreps_out = o3.Irreps([(mul, ir) for _, ir in _reachable(channel_irreps, correlation)])
    m = _module(irreps_in, irreps_out, correlation)
    a, species = _inputs(m, 10)
    r = _random_o3(correlation + 10 * inversion, inversion)
    d_in, d_out = _irreps_d(irreps_in, r), _irreps_d(irreps_out, r)
    out = m(a, species)
    out_rot = m(a @ d_in.T, species)
    err = (out_rot - out @ d_out.T).abs().max() / out.abs().max()
    assert err <= 1e-10, f"{irreps_in} -> {irreps_out}: relative error {err:.2e}"


def test_channel_wise():
    m = _module("4x0e+4x1o+4x2e", "4x0e+4x1o+4x2e", 3)
    a, species = _inputs(m, 5)
    out = to_channels_last(m(a, species), m.irreps_out)
    c = 2
    x = to_channels_last(a, m.irreps_in)
    x_pert = x.clone()
    x_pert[:, c] += torch.randn_like(x_pert[:, c])
    a_pert = from_channels_last(x_pert, m.irreps_in)
    out_pert = to_channels_last(m(a_pert, species), m.irreps_out)
    diff = (out_pert - out).abs().amax(dim=(0, 2))
    assert diff[c] > 1e-3
    assert torch.all(diff[torch.arange(4) != c] == 0)


def test_element_dependence_and_batching():
    m = _module("2x0e+2x1o", "2x0e+2x1o", 3, num_elements=3)
    a, _ = _inputs(m, 4)
    outs = [m(a, torch.full((4,), z)) for z in range(3)]
    for z1, z2 in itertools.combinations(range(3), 2):
        assert (outs[z1] - outs[z2]).abs().max() > 1e-3
    mixed = torch.tensor([0, 2, 1, 2])
    out = m(a, mixed)
    for i, z in enumerate(mixed.tolist()):
        assert torch.allclose(out[i], outs[z][i], atol=1e-14)
        assert torch.allclose(out[i : i + 1], m(a[i : i + 1], mixed[i : i + 1]), atol=1e-14)


def test_correlation_one_is_linear_in_matching_irrep():
    m = _module("4x0e+4x1o+4x2e", "4x1o", 1, num_elements=2)
    assert m.paths("1o") == {1: 1}
    a, species = _inputs(m, 6)
    out = m(a, species).reshape(6, 4, 3)
    block = a[:, o3.Irreps("4x0e+4x1o+4x2e").slices()[1]].reshape(6, 4, 3)
    w = m.weights[0][species, 0, :]  # [n, C]
    assert torch.allclose(out, w[:, :, None] * block, atol=1e-14)


def test_gradients_flow():
    m = _module("2x0e+2x1o+2x2e", "2x0e+2x1o", 3)
    a, species = _inputs(m, 5)
    a.requires_grad_(True)
    m(a, species).pow(2).sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().max() > 0
    for w in m.weights:
        assert w.grad is not None and w.grad.abs().max() > 0
    small = _module("1x0e+1x1o", "1x0e+1x1o", 3)
    x, z = _inputs(small, 2)
    assert torch.autograd.gradcheck(lambda t: small(t, z), (x.requires_grad_(True),))


def test_dtype_conversion():
    m = _module("2x0e+2x1o+2x2e", "2x0e+2x1o", 3)
    assert m.U_3.dtype == F64
    a, species = _inputs(m, 5)
    ref = m(a, species).detach()
    m32 = m.to(torch.float32)
    assert m32.U_3.dtype == torch.float32 and m32.weights[0].dtype == torch.float32
    out = m32(a.float(), species)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=1e-5 * float(ref.abs().max()))


def test_state_dict_roundtrip():
    m1 = _module("2x0e+2x1o", "2x0e+2x1o", 2, seed=0)
    m2 = _module("2x0e+2x1o", "2x0e+2x1o", 2, seed=1)
    a, species = _inputs(m1, 3)
    assert not torch.allclose(m1(a, species), m2(a, species))
    m2.load_state_dict(m1.state_dict())
    assert torch.equal(m1(a, species), m2(a, species))


def test_cg_engine_uses_it():
    from potentials.nn.tp import get_engine

    pb = get_engine("cg").product_basis(o3.Irreps("2x0e+2x1o"), o3.Irreps("2x0e"), 2, 3)
    assert pb.irreps_in == o3.Irreps("2x0e+2x1o") and pb.irreps_out == o3.Irreps("2x0e")
    a = torch.randn(3, 8)
    assert pb(a, torch.tensor([0, 1, 2])).shape == (3, 2)


@pytest.mark.parametrize(
    "irreps_in, irreps_out, correlation, match",
    [
        ("4x0e", "4x1o", 3, "cannot be reached"),
        ("4x0e+4x1o", "4x1e", 1, "cannot be reached"),
        ("4x0e+3x1o", "4x0e", 2, "multiplicit"),
        ("4x0e+4x1o", "3x0e", 2, "multiplicity"),
        ("4x0e+4x1o", "4x0e", 0, "correlation"),
        ("4x0e+4x1o", "4x0e", -1, "correlation"),
        ("4x0e+4x1o", "4x0e", 1.5, "correlation"),
    ],
)
def test_bad_input_raises(irreps_in, irreps_out, correlation, match):
    with pytest.raises(PotentialsError, match=match):
        SymmetricContraction(irreps_in, irreps_out, correlation, 2)
