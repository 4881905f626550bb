"""``gaunt_fft``: exact Gaunt products through the 2D Fourier basis (Luo, Chen, Krishnapriyan 2024; alias ``fft``).

On the torus θ, α ∈ [0, 2π) every ``Y_lm(θ, α) = Λ_{l|m|}(θ) φ_m(α)`` is a trigonometric polynomial,
``Y_lm = Σ_{|u|≤l, v=±m} y^{lm}_{uv} e^{i(uθ+vα)}``, so a product of spherical functions is a 2D convolution of
Fourier coefficients. Pipeline:

1. **SH → 2D Fourier** (``sh2f``): ``F[u, v] = Σ_l θ̂_{l|v|}[u] · (x_{l,|v|} ∓ i x_{l,−|v|})/2`` — the θ-coefficients
   ``θ̂`` are read off e3nn's SH sampled on 2L+2 torus points by an FFT (exact for degree ≤ L) and stored compact,
   [L+1 (|m|), 2L+1 (u), L+1−|m| (l)] instead of GTP's dense [L, 2L−1, 2L−1, 2]; only v ≥ 0 is kept (real f).
2. **Product**: zero-padded FFT convolution — ``irfft2`` to ``P_θ × P_α`` samples, pointwise product, ``rfft2`` —
   with ``P_θ ≥ 2(L1+L2)+1`` (every u of the product is needed) and ``P_α ≥ L1+L2+Lout+1`` (v beyond ±Lout may
   alias). ``mode``: 'fft' (``torch.fft``), 'direct' (direct convolution of the coefficient arrays; small L),
   'dft' (the same padded transforms as GEMMs with the DFT matrices, sh2f∘iDFT_θ and DFT_θ∘f2sh precomposed:
   the fastest on CPU at L ≤ 8, where ``torch.fft`` has a large per-transform cost), 'auto' (dft, or fft on GPU
   for P_θ ≥ 32). On CPU 'direct' measured 20–40× slower than 'dft' even at L ≤ 3, so auto never picks it.
3. **2D Fourier → SH** (``f2sh``): exact, ``z_lm = ∫_0^π∫_0^{2π} h Y_lm sinθ dα dθ = Σ_u H[u, |m|] Θ_{l|m|}[u]`` ×
   (2π Re | −2π Im) with ``Θ_{lk}[u] = Σ_w λ_{lk}[w] J(u+w)``, ``λ`` the Fourier coefficients of ``Λ_{lk}(θ) sinθ``
   and the closed form ``J(n) = ∫_0^π e^{inθ} dθ`` = π (n = 0), 0 (n even), 2i/n (n odd).

Powers ``f^ν``: one sh2f, ``P_θ ≥ 2ν_max·L_A+1``, ``P_α ≥ ν_max·L_A+L_out+1``, pointwise powers, one f2sh per ν.
"""

from __future__ import annotations

import functools
import math

import torch

from potentials.errors import PotentialsError
from potentials.nn.tp.base import register_engine
from potentials.nn.tp.gaunt import (
    GauntEngine,
    RingPowerKernel,
    RingProductKernel,
    SphericalPowerKernel,
    SphericalProductKernel,
)
from potentials.nn.tp.rings import RingGrid, legendre_table, m_major_order

MODES = ("auto", "dft", "fft", "direct")


# ----------------------------------------------------------------------------------------------------------
# Change-of-basis tables (float64/complex128, built once)
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def theta_fourier(lmax: int) -> torch.Tensor:
    """``θ̂_{lk}[u]``: Fourier coefficients of ``Λ_{lk}(θ)`` on the torus, complex128 [L+1 (k), 2L+1 (u = −L..L), L+1 (l)]."""
    s = 2 * lmax + 2
    thetas = 2 * math.pi * torch.arange(s, dtype=torch.float64) / s
    lam = legendre_table(lmax, thetas)  # [s, k, l]
    coef = torch.fft.fft(lam.to(torch.complex128), dim=0) / s  # u = 0..s-1 (wrapped)
    if coef[lmax + 1].abs().max() > 1e-12:  # Nyquist bin must vanish: degree ≤ L
        raise RuntimeError("Λ_lk(θ) has a Fourier component above its degree; e3nn convention changed?")
    idx = torch.tensor([u % s for u in range(-lmax, lmax + 1)])
    return coef[idx].permute(1, 0, 2).contiguous()


def j_integral(n: torch.Tensor) -> torch.Tensor:
    """``J(n) = ∫_0^π e^{inθ} dθ`` (closed form), complex128 for integer tensor ``n``."""
    n = n.to(torch.float64)
    odd = torch.remainder(n, 2) == 1
    out = torch.zeros(n.shape, dtype=torch.complex128)
    out[n == 0] = math.pi
    out[odd] = 2j / n[odd]
    return out


@functools.lru_cache(maxsize=None)
def projection_table(lmax: int, umax: int) -> torch.Tensor:
    """``Θ_{lk}[u] = ∫_0^π e^{iuθ} Λ_{lk}(θ) sinθ dθ`` for u = −U..U: complex128 [L+1 (k), 2U+1, L+1 (l)]."""
    th = theta_fourier(lmax)  # u = −L..L
    # λ[w] = Fourier coefficients of Λ·sinθ, w = −(L+1)..L+1: (θ̂[w−1] − θ̂[w+1]) / 2i
    pad = torch.nn.functional.pad(th, (0, 0, 2, 2))  # u = −L−2..L+2
    lam = (pad[:, :-2] - pad[:, 2:]) / 2j  # w = −L−1..L+1
    w = torch.arange(-lmax - 1, lmax + 2)
    u = torch.arange(-umax, umax + 1)
    jm = j_integral(u[:, None] + w[None, :])  # [2U+1, 2L+3]
    return torch.einsum("uw,kwl->kul", jm, lam)


class TorusGrid(RingGrid):
    """Uniform θ_b = 2πb/P_θ on [0, 2π) × α_a = 2πa/P_α: the padded-DFT grid of the 2D Fourier product.

    ``synthesis`` = ``Σ_u θ̂[u] e^{iuθ_b}`` (sh2f followed by the inverse θ-DFT); ``analysis`` = the θ-DFT of the
    samples followed by the J-projection, ``Re Σ_{|u|≤U} e^{−iuθ_b} Θ[u] / P_θ`` (exact for P_θ ≥ 2U+1)."""

    def __init__(self, n_theta: int, n_alpha: int, umax: int):
        self.n_theta, self.n_alpha, self.umax = int(n_theta), int(n_alpha), int(umax)
        self.thetas = 2 * math.pi * torch.arange(self.n_theta, dtype=torch.float64) / self.n_theta

    def synthesis(self, lmax: int) -> torch.Tensor:
        u = torch.arange(-lmax, lmax + 1, dtype=torch.float64)
        e = torch.exp(1j * self.thetas[:, None] * u[None, :])  # [P, 2L+1]
        return torch.einsum("bu,kul->bkl", e, theta_fourier(lmax)).real.contiguous()

    def analysis(self, lmax: int) -> torch.Tensor:
        u = torch.arange(-self.umax, self.umax + 1, dtype=torch.float64)
        e = torch.exp(-1j * self.thetas[:, None] * u[None, :]) / self.n_theta
        out = torch.einsum("bu,kul->bkl", e, projection_table(lmax, self.umax))
        if out.imag.abs().max() > 1e-12:
            raise RuntimeError("J-projection table is not real")
        return out.real.contiguous()


def minimal_torus(umax: int, degree: int) -> tuple[int, int]:
    """Smallest exact torus ``(P_θ, P_α)``: linear convolution in θ (2U+1), aliasing-free to Lout in α (D+1)."""
    return 2 * umax + 1, degree + 1


def check_torus(resolution, umax: int, degree: int, what: str) -> tuple[int, int]:
    pt_min, pa_min = minimal_torus(umax, degree)
    if resolution is None:
        return pt_min, pa_min
    pt, pa = (int(r) for r in resolution)
    if pt < pt_min or pa < pa_min:
        raise PotentialsError(
            f"gaunt_fft: resolution (n_theta={pt}, n_alpha={pa}) is too small for {what}: the product has θ-degree "
            f"U = {umax} and D = {degree}, so it needs at least n_theta = 2U+1 = {pt_min} and n_alpha = D+1 = {pa_min} "
            f"(minimum resolution ({pt_min}, {pa_min}))"
        )
    return pt, pa


def _pick_mode(mode: str, small: int, large: int, n_theta: int) -> str:
    if mode not in MODES:
        raise PotentialsError(f"gaunt_fft: unknown mode {mode!r}; choose one of {MODES}")
    if mode != "auto":
        return mode
    # Measured on CPU (float32, 65k rows, fwd+bwd, L ≤ 3): dft 17–47 ms, fft 370–970 ms, direct 480–2300 ms,
    # so 'direct' (complex slice updates) is never picked automatically; cuFFT is used for large tori on GPU.
    if torch.cuda.is_available() and n_theta >= 32:
        return "fft"
    return "dft"


# ----------------------------------------------------------------------------------------------------------
# Explicit Fourier pipeline ('fft' and 'direct' modes)
# ----------------------------------------------------------------------------------------------------------


class _SH2F(torch.nn.Module):
    """x [M, (L+1)²] → half spectrum F [M, 2L+1 (u = −L..L), L+1 (v = 0..L)] complex (block-sparse in |m|)."""

    def __init__(self, lmax: int):
        super().__init__()
        self.lmax = lmax
        th = theta_fourier(lmax)  # [k, u, l]
        perm, _ = m_major_order(lmax)
        self.register_buffer("perm", torch.tensor(perm), persistent=False)
        # per k: real table mapping (x_{l,+k}, x_{l,−k}) → (Re, Im) of F[u, k]; stored [Σ, 2(2L+1)] compactly
        blocks = []
        for k in range(lmax + 1):
            t = th[k, :, k:].t()  # [Lp, 2L+1] complex
            s = 1.0 if k == 0 else 0.5
            plus = torch.cat([t.real, t.imag], dim=1) * s  # x_{l,+k} · θ̂
            minus = torch.cat([t.imag, -t.real], dim=1) * s  # −i x_{l,−k} θ̂ → (Im θ̂, −Re θ̂)
            blocks.append(plus if k == 0 else torch.cat([plus, minus], dim=0))
        self.sizes = [b.shape[0] for b in blocks]
        self.register_buffer("table", torch.cat(blocks, dim=0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tab = self.table.to(x.dtype)
        xp = x[:, self.perm]
        cols, start = [], 0
        for n in self.sizes:
            cols.append(xp[:, start:start + n] @ tab[start:start + n])  # [M, 2(2L+1)]
            start += n
        f = torch.stack(cols, dim=-1)  # [M, 2(2L+1), L+1]
        u = 2 * self.lmax + 1
        return torch.complex(f[:, :u], f[:, u:])


class _F2SH(torch.nn.Module):
    """Half spectrum H [M, 2U+1 (u centred), ≥L+1 (v)] complex → z [M, (L+1)²] (exact J-projection)."""

    def __init__(self, lmax: int, umax: int):
        super().__init__()
        self.lmax = lmax
        proj = projection_table(lmax, umax)  # [k, 2U+1, l]
        perm, _ = m_major_order(lmax)
        inv = torch.empty(len(perm), dtype=torch.long)
        inv[torch.tensor(perm)] = torch.arange(len(perm))
        self.register_buffer("inv", inv, persistent=False)
        self.register_buffer("re", (2 * math.pi) * proj.real.contiguous(), persistent=False)
        self.register_buffer("im", (2 * math.pi) * proj.imag.contiguous(), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        re_t, im_t = self.re.to(h.real.dtype), self.im.to(h.real.dtype)
        hr, hi = h.real, h.imag
        out = []
        for k in range(self.lmax + 1):
            a, b = re_t[k, :, k:], im_t[k, :, k:]  # [2U+1, Lp]
            sr = hr[:, :, k] @ a - hi[:, :, k] @ b  # 2π Re S
            out.append(sr)
            if k:
                out.append(-(hr[:, :, k] @ b + hi[:, :, k] @ a))  # −2π Im S
        return torch.cat(out, dim=1)[:, self.inv]


def _full_spectrum(f: torch.Tensor) -> torch.Tensor:
    """Half spectrum [M, 2L+1, L+1] (v ≥ 0) → full [M, 2L+1, 2L+1] (v = −L..L) of a real function."""
    neg = torch.conj(f.flip(1)[:, :, 1:]).flip(2)
    return torch.cat([neg, f], dim=2)


def _conv2d_direct(a: torch.Tensor, b: torch.Tensor, v_lo: int, v_hi: int) -> torch.Tensor:
    """Linear 2D convolution of centred spectra a [M, 2A+1, 2B+1], b [M, 2C+1, 2D+1], output rows u = −(A+C)..A+C
    and columns v = v_lo..v_hi (relative to the centre). Loops over the entries of the smaller operand."""
    if a.shape[1] * a.shape[2] < b.shape[1] * b.shape[2]:
        a, b = b, a
    ua, va = (a.shape[1] - 1) // 2, (a.shape[2] - 1) // 2
    ub, vb = (b.shape[1] - 1) // 2, (b.shape[2] - 1) // 2
    out = a.new_zeros(a.shape[0], 2 * (ua + ub) + 1, v_hi - v_lo + 1)
    for i in range(2 * ub + 1):
        for j in range(2 * vb + 1):
            v2 = j - vb
            lo, hi = max(-va, v_lo - v2), min(va, v_hi - v2)
            if lo > hi:
                continue
            term = a[:, :, lo + va:hi + va + 1] * b[:, i, j, None, None]
            out[:, i:i + 2 * ua + 1, lo + v2 - v_lo:hi + v2 - v_lo + 1] += term
    return out


class _FourierMixin:
    def _init_fourier(self, lmax_list, lmax_out, umax, degree, resolution):
        self.umax = umax
        self.n_theta, self.n_alpha = check_torus(resolution, umax, degree, self._what)
        self.sh2f = torch.nn.ModuleDict({str(l): _SH2F(l) for l in sorted(set(lmax_list))})
        self.f2sh = _F2SH(lmax_out, umax)

    def _pad(self, f: torch.Tensor) -> torch.Tensor:
        """Half spectrum [M, 2L+1, L+1] → zero-padded wrapped array [M, P_θ, P_α//2+1]."""
        lmax = (f.shape[1] - 1) // 2
        v = self.n_alpha // 2 + 1
        f = torch.cat([f, f.new_zeros(f.shape[0], f.shape[1], v - f.shape[2])], dim=2) if v > f.shape[2] else f
        idx = torch.tensor([u % self.n_theta for u in range(-lmax, lmax + 1)], device=f.device)
        return f.new_zeros(f.shape[0], self.n_theta, v).index_copy(1, idx, f)

    def _unpad(self, h: torch.Tensor) -> torch.Tensor:
        """rfft2 output [M, P_θ, V] → centred [M, 2U+1, Lout+1]."""
        idx = torch.tensor([u % self.n_theta for u in range(-self.umax, self.umax + 1)], device=h.device)
        return h.index_select(1, idx)[:, :, : self.f2sh.lmax + 1]

    def _samples(self, x: torch.Tensor, lmax: int) -> torch.Tensor:
        f = self.sh2f[str(lmax)](x)
        return torch.fft.irfft2(self._pad(f), s=(self.n_theta, self.n_alpha), norm="forward")

    def _coefficients(self, h: torch.Tensor) -> torch.Tensor:
        return self._unpad(torch.fft.rfft2(h, norm="forward"))


class FourierProductKernel(_FourierMixin, SphericalProductKernel):
    """Exact Gaunt product by the explicit 2D-Fourier pipeline ('fft' or 'direct' convolution)."""

    def __init__(self, lmax1, lmax2, lmax_out, resolution=None, mode: str = "fft"):
        SphericalProductKernel.__init__(self, lmax1, lmax2, lmax_out)
        self._what = f"the product (L1, L2, Lout) = ({lmax1}, {lmax2}, {lmax_out})"
        self.mode = mode
        self._init_fourier([max(lmax1, 1), max(lmax2, 1)], lmax_out, lmax1 + lmax2, lmax1 + lmax2 + lmax_out, resolution)

    def _product(self, x, y):
        if self.mode == "fft":
            return self.f2sh(self._coefficients(self._samples(x, self.lmax1) * self._samples(y, self.lmax2)))
        f1 = _full_spectrum(self.sh2f[str(self.lmax1)](x))
        f2 = _full_spectrum(self.sh2f[str(self.lmax2)](y))
        return self.f2sh(_conv2d_direct(f1, f2, 0, self.lmax_out))


class FourierPowerKernel(_FourierMixin, SphericalPowerKernel):
    """Exact powers by the explicit 2D-Fourier pipeline ('fft' or repeated 'direct' convolution)."""

    def __init__(self, lmax_in, nu_max, lmax_out, resolution=None, mode: str = "fft"):
        SphericalPowerKernel.__init__(self, lmax_in, nu_max, lmax_out)
        self._what = f"powers up to nu={nu_max} of degree {lmax_in} projected to {lmax_out}"
        self.mode = mode
        self._init_fourier([max(lmax_in, 1)], lmax_out, nu_max * lmax_in, nu_max * lmax_in + lmax_out, resolution)

    def _powers(self, x):
        if self.mode == "fft":
            f = self._samples(x, self.lmax_in)
            p, out = f, []
            for _ in range(2, self.nu_max + 1):
                p = p * f
                out.append(self.f2sh(self._coefficients(p)))
            return torch.stack(out, dim=1)
        f = _full_spectrum(self.sh2f[str(self.lmax_in)](x))
        p, out = f, []
        for nu in range(2, self.nu_max + 1):
            top = nu * self.lmax_in
            half = _conv2d_direct(p, f, 0, min(top, self.lmax_out))
            h = torch.nn.functional.pad(half, (0, 0, self.umax - top, self.umax - top))
            out.append(self.f2sh(h))
            if nu < self.nu_max:
                p = _conv2d_direct(p, f, -top, top)
        return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------------------------------------
# Kernels and engine
# ----------------------------------------------------------------------------------------------------------


def product_kernel(lmax1, lmax2, lmax_out, resolution=None, mode: str = "auto", strategy: str = "auto"):
    """The gaunt_fft product kernel for (L1, L2 → Lout); ``mode`` picks the convolution (see module doc)."""
    umax, degree = lmax1 + lmax2, lmax1 + lmax2 + lmax_out
    pt, pa = check_torus(resolution, umax, degree, f"the product (L1, L2, Lout) = ({lmax1}, {lmax2}, {lmax_out})")
    mode = _pick_mode(mode, min(lmax1, lmax2), max(lmax1, lmax2), pt)
    if mode == "dft":
        kernel = RingProductKernel(lmax1, lmax2, lmax_out, TorusGrid(pt, pa, umax), strategy)
    else:
        kernel = FourierProductKernel(lmax1, lmax2, lmax_out, (pt, pa), mode)
    kernel.mode = mode
    return kernel


def power_kernel(lmax_in, nu_max, lmax_out, resolution=None, mode: str = "auto", strategy: str = "auto"):
    """The gaunt_fft power kernel ``P_{≤Lout}[f^ν]``, ν ≤ ν_max."""
    umax, degree = nu_max * lmax_in, nu_max * lmax_in + lmax_out
    pt, pa = check_torus(resolution, umax, degree, f"powers up to nu={nu_max} of degree {lmax_in} projected to {lmax_out}")
    mode = _pick_mode(mode, lmax_in, lmax_in, pt)
    if mode == "dft":
        kernel = RingPowerKernel(lmax_in, nu_max, lmax_out, TorusGrid(pt, pa, umax), strategy)
    else:
        kernel = FourierPowerKernel(lmax_in, nu_max, lmax_out, (pt, pa), mode)
    kernel.mode = mode
    return kernel


@register_engine("gaunt_fft")
class GauntFFTEngine(GauntEngine):
    """Gaunt products in the 2D Fourier basis. ``resolution=(n_theta, n_alpha)`` forces the torus size (checked);
    ``mode`` ∈ {auto, dft, fft, direct} picks the convolution."""

    def __init__(self, resolution=None, mode: str = "auto", strategy: str = "auto"):
        super().__init__(resolution)
        if mode not in MODES:
            raise PotentialsError(f"gaunt_fft: unknown mode {mode!r}; choose one of {MODES}")
        self.mode, self.strategy = mode, strategy

    def product_kernel(self, lmax1, lmax2, lmax_out):
        return product_kernel(lmax1, lmax2, lmax_out, self.resolution, self.mode, self.strategy)

    def power_kernel(self, lmax_in, nu_max, lmax_out):
        return power_kernel(lmax_in, nu_max, lmax_out, self.resolution, self.mode, self.strategy)
