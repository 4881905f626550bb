"""Report of ``bench_uncertainty.py``: its Markdown (full run and ``--cost-only``) and its spread-vs-error plot.

Renders the payload that ``bench_uncertainty.py`` measured (calibration of the committee / LLPR / LLPR-Jacobian
estimates on the test sets, cost per calculator call); measures nothing itself.
"""

from __future__ import annotations

from pathlib import Path

from bench_report import fmt, machine_markdown, markdown_table

COST_LEGEND = (
    "`committee_N`: the calculator with N members as shipped (`potentials.uncertainty.committee`, strategy \"auto\": "
    "elements validated once, then the fastest of the strategies below that this model allows, timed on its first "
    "calls at each size); `committee_N_fused` / `_stored` / `_vmap`: `Committee.evaluate` with that strategy (graph "
    "built, no ASE overhead): members one by one inside `fused_inference`, members one by one with stored "
    "intermediates, or one `torch.func.vmap` pass over the stacked weights (in this row only, `scatter_sum` is "
    "swapped for an out-of-place copy that vmap accepts; without it the calculator cannot use vmap); "
    "`members_one_by_one_fused_N` = `committee_N_fused` without the committee wrapper; `members_one_pass_fused_N`: "
    "the earlier committee path (each member its own leaf positions, one backward of Σ E_m, fused kernels); "
    "`plain_stored`: one model without the fused kernels (graph built, no ASE overhead)."
)



def cost_markdown(p: dict, archs: dict[str, dict]) -> str:
    """Markdown of a ``--cost-only`` run; ``archs``: the architectures by name, in the order of the report."""
    n = p["members"]
    t = {(r["arch"], r["structure"], r["variant"]): r for r in p["timings"]}
    keys = sorted({(r["arch"], r["structure"]) for r in p["timings"]}, key=lambda k: (list(archs).index(k[0]), k[1]))
    return "\n".join([
        "# Uncertainty: cost of a committee call", "", f"Command: `{p['command']}`", "",
        machine_markdown(p["machine"], None), "",
        f"{n} members (seeded random initialisations: the cost does not depend on the weight values), MACE with the "
        "`cg` engine in float64, element table H C N O Cu Au; architectures: "
        + "; ".join(f"`{a}` = {archs[a]}" for a in p["arch"]) + ". "
        f"{p['warmup']} warm-up and {p['repeat']} timed calls each, interleaved rounds, torch threads = {p['threads']}. "
        "Per call: energy and forces (and stress for the periodic cell). Ratios to the plain calculator call.", "",
        "## Committee / one model", "",
        markdown_table(["arch", "structure", "atoms", "edges", "plain min ms", f"committee_{n} / plain (median)",
                        f"committee_{n} / plain (min)", "target", "auto chose",
                        "vmap / plain (min)"],
                       [(a, s, t[(a, s, "plain")]["n_atoms"], t[(a, s, "plain")]["n_edges"], 1e3 * t[(a, s, "plain")]["min_s"],
                         t[(a, s, f"committee_{n}")]["ratio_median"], t[(a, s, f"committee_{n}")]["ratio_min"],
                         "≤ 2.5 " + ("met" if t[(a, s, f"committee_{n}")]["ratio_min"] <= 2.5 else "**not met**"),
                         ", ".join(t[(a, s, "plain")]["auto_choice"]), t[(a, s, f"committee_{n}_vmap")]["ratio_min"])
                        for a, s in keys]),
        "", "## All options", "",
        markdown_table(["arch", "structure", "variant", "median ms", "min ms", "ratio (median)", "ratio (min)"],
                       [(r["arch"], r["structure"], r["variant"], 1e3 * r["median_s"], 1e3 * r["min_s"], r["ratio_median"],
                         r["ratio_min"]) for r in p["timings"]]),
        "", COST_LEGEND,
    ])


def plot(payload, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(payload["calibration"])
    fig, axes = plt.subplots(1, len(methods), figsize=(4.7 * len(methods), 4.2))
    for ax, method in zip(axes, methods):
        for s, row in payload["calibration"][method]["sets"].items():
            ax.scatter(row["spread"], row["error"], s=10, alpha=0.7, label=s.replace("test_", ""))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("predicted force spread per structure (meV/Å)")
        ax.set_ylabel("force RMSE per structure (meV/Å)")
        c = payload["calibration"][method]["all"]
        ax.set_title(f"{method}: ρ = {c['spearman_forces_structure']:.2f}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def to_markdown(p: dict, png: str | None) -> str:
    c, ll, lj = p["calibration"]["committee"], p["calibration"]["llpr"], p["calibration"]["llpr-jacobian"]
    n = p["members"]
    t = {(r["n_atoms"], r["variant"]): r for r in p["timings"]}
    sizes = sorted({r["n_atoms"] for r in p["timings"]})
    big = max(sizes)
    ratio_llpr, ratio_comm = t[(big, "llpr")]["ratio_median"], t[(big, f"committee_{n}")]["ratio_median"]
    targets = [
        ("Spearman ρ(force spread, force error) per structure, committee (all test sets)", "≥ 0.6",
         c["all"]["spearman_forces_structure"], c["all"]["spearman_forces_structure"] >= 0.6),
        ("Spearman ρ per structure, LLPR (all test sets)", "≥ 0.4", ll["all"]["spearman_forces_structure"],
         ll["all"]["spearman_forces_structure"] >= 0.4),
        ("Spearman ρ per structure, LLPR-Jacobian (all test sets)", "≥ 0.4", lj["all"]["spearman_forces_structure"],
         lj["all"]["spearman_forces_structure"] >= 0.4),
        ("mean spread out of domain / in domain (min over hot, strained), committee", "> 1", c["ood_over_id_spread"],
         c["ood_over_id_spread"] > 1),
        ("same, LLPR", "> 1", ll["ood_over_id_spread"], ll["ood_over_id_spread"] > 1),
        ("same, LLPR-Jacobian", "> 1", lj["ood_over_id_spread"], lj["ood_over_id_spread"] > 1),
        (f"LLPR call / plain call (median, {big} atoms)", "≤ 1.3", ratio_llpr, ratio_llpr <= 1.3),
        (f"LLPR call / plain call (minimum, {big} atoms)", "≤ 1.3", t[(big, "llpr")]["ratio_min"], t[(big, "llpr")]["ratio_min"] <= 1.3),
        (f"LLPR-Jacobian call / plain call (minimum, {big} atoms)", "≤ 1.3", t[(big, "llpr-jacobian")]["ratio_min"],
         t[(big, "llpr-jacobian")]["ratio_min"] <= 1.3),
        (f"committee of {n} / plain call (median, {big} atoms)", "≤ 2.5", ratio_comm, ratio_comm <= 2.5),
        (f"committee of {n} / plain call (minimum, {big} atoms)", "≤ 2.5", t[(big, f"committee_{n}")]["ratio_min"],
         t[(big, f"committee_{n}")]["ratio_min"] <= 2.5),
    ]
    lines = [
        "# Uncertainty: calibration and cost", "", f"Command: `{p['command']}`", "",
        machine_markdown(p["machine"], None), "",
        f"Training ({n} members in one Hydra multirun, {p['training']['wall_s']:.0f} s wall, "
        f"{p['training']['cpu_s']:.0f} CPU-s{'; trained by an earlier run of this script into the same --out-dir, reused' if p['training'].get('reused') else ''}): "
        f"`{p['training']['command']}`", "",
        f"LLPR fit on member 0: d = {p['llpr']['dim']} readout features, ς² = {p['llpr']['regularizer']:.2g}, "
        f"α_E = {p['llpr']['alpha_energy']:.3g}, α_F = {p['llpr']['alpha_forces']:.3g}, "
        f"α_F Jacobian = {p['llpr']['alpha_forces_jacobian']:.3g} (validation set), "
        f"{p['llpr']['fit_s']:.1f} s.", "",
        "Data: ASE EMT Cu–Au (8/16-atom fcc cells); train/validation 300–600 K, ±1 % strain; test sets: in domain "
        "(same recipe, new seed), hot (1,200–1,500 K), strained (±6 % isotropic, ≤5 % shear). "
        "Force spread per structure = √(mean_i σ_i²/3); error = force-component RMSE of the structure.", "",
        "## Targets", "",
        markdown_table(["quantity", "target", "measured", "met"], [(a, b, v, "yes" if ok else "**no**") for a, b, v, ok in targets]),
        "", "## Calibration", "",
        markdown_table(
            ["method", "ρ struct (all)", "ρ if calibrated (simulated)", "ρ struct (in domain)", "ρ per atom (all)",
             "ρ energy/struct (all)", "miscal. area F comp (all)", "ZMS F comp (in domain)"],
            [(m, d["all"]["spearman_forces_structure"], d["all"]["spearman_forces_structure_simulated"],
              d["in_domain"]["spearman_forces_structure"], d["all"]["spearman_forces_atom"],
              d["all"]["spearman_energy_structure"], d["all"]["miscalibration_area_force_components"],
              d["in_domain"]["zms_force_components"]) for m, d in (("committee", c), ("LLPR", ll), ("LLPR-Jacobian", lj))]),
        "", markdown_table(
            ["test set", "n", "F RMSE meV/Å (member 0 / committee mean)", "mean spread committee / LLPR / LLPR-J meV/Å",
             "ρ committee", "ρ LLPR", "ρ LLPR-J"],
            [(s.replace("test_", ""), c["sets"][s]["n"], f"{ll['sets'][s]['force_rmse_meV']:.1f} / {c['sets'][s]['force_rmse_meV']:.1f}",
              " / ".join(fmt(x["sets"][s]["mean_force_spread_meV"]) for x in (c, ll, lj)),
              c["sets"][s]["spearman_structure"], ll["sets"][s]["spearman_structure"], lj["sets"][s]["spearman_structure"])
             for s in c["sets"]]),  # the test sets, in the order they were measured
        "", "## Cost per calculator call (energy, forces, stress)", "",
        f"{p['warmup']} warm-up and {p['repeat']} timed calls each (interleaved rounds: plain, LLPR, LLPR-Jacobian, committee, one by one), "
        f"torch threads = {p['threads']}; ratios to the plain call. The machine is shared (see load average), so minima are "
        "the steadier numbers.", "",
        markdown_table(["atoms", "variant", "median ms", "min ms", "ratio (median)", "ratio (min)"],
                       [(r["n_atoms"], r["variant"], 1e3 * r["median_s"], 1e3 * r["min_s"], r["ratio_median"], r["ratio_min"])
                        for r in p["timings"]]),
        "", COST_LEGEND, "", "Committee evaluation options on larger (reference-size) models, and the 27-atom molecule: "
        "[uncertainty.cost.md](uncertainty.cost.md) (`--cost-only`).",
    ]
    if png:
        lines += ["", f"![spread vs error]({png})"]
    return "\n".join(lines)
