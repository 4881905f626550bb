"""potentials: E(3)-equivariant machine-learned interatomic potentials with swappable tensor products.

    from potentials import PotentialCalculator
    calc = PotentialCalculator.from_checkpoint("runs/demo/checkpoints/last.ckpt", device="cpu")
"""

__version__ = "0.1.0"

__all__ = ["PotentialCalculator", "PotentialsError", "__version__"]


def __getattr__(name):  # lazy: keep `import potentials` light
    if name == "PotentialCalculator":
        from potentials.calculator import PotentialCalculator

        return PotentialCalculator
    if name == "PotentialsError":
        from potentials.errors import PotentialsError

        return PotentialsError
    raise AttributeError(name)
