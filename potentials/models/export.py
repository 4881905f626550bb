"""Export a model as a self-contained AOTInductor package: compiled C++ code + weights, no Python model code.

The package (a ``.pt2`` zip written by ``torch._inductor.aoti_compile_and_package``) holds one graph for one
structure (B = 1) with symbolic numbers of atoms n ≥ 2 and edges E ≥ 2; the neighbour list is the host's job.

Inputs, in this order (float = the export dtype of the positions, ``float64`` unless asked otherwise):

==========  ==========  ======  ==================================================================
positions   [n, 3]      float   Å
cell        [1, 3, 3]   float   Å, rows = lattice vectors (zeros for a molecule)
pbc         [1, 3]      bool
species     [n]         long    index of each atom's Z in the metadata's ``atomic_numbers``
edge_index  [2, E]      long    (centre i, neighbour j), every pair within ``r_max`` in both directions
shifts      [E, 3]      float   integer cell shifts S: r_ij = x_j − x_i + S · cell
batch       [n]         long    zeros
num_atoms   [1]         long    n
==========  ==========  ======  ==================================================================

Outputs: ``energy`` [1] (eV), ``forces`` [n, 3] (eV/Å), ``stress`` [1, 3, 3] (eV/Å³, ASE sign; zero unless
periodic). Metadata (strings): ``format`` (``potentials-aoti-1``), ``atomic_numbers`` (comma-separated Z),
``r_max`` (Å), ``dtype`` (model dtype), ``inputs``, ``outputs``, ``potentials_version``.

Load in Python with ``torch._inductor.aoti_load_package(path)`` (see :mod:`potentials.exported`), in C++ with
``torch::inductor::AOTIModelPackageLoader(path)`` → ``run(std::vector<at::Tensor>)``.
"""

from __future__ import annotations

import os

import torch

from potentials.data.graph import AtomicGraph
from potentials.errors import PotentialsError
from potentials.io import atomic_path
from potentials.models.compiled import INPUT_KEYS, graph_inputs, trace

FORMAT = "potentials-aoti-1"
OUTPUT_KEYS = ("energy", "forces", "stress")


def example_graph(model: torch.nn.Module, num_atoms: int = 8) -> AtomicGraph:
    """A small periodic structure of the model's first element, for tracing (sizes only; any will do)."""
    from ase.build import bulk

    from potentials.data.neighbors import atoms_to_graph

    atoms = bulk("Cu", "sc", a=0.45 * float(model.r_max), cubic=True).repeat((2, 2, 2))[:num_atoms]
    atoms.rattle(0.01, seed=0)
    atoms.numbers[:] = model.atomic_numbers[0]
    atoms.numbers[1::2] = model.atomic_numbers[-1]
    graph = atoms_to_graph(atoms, float(model.r_max))
    graph["batch"] = torch.zeros(len(atoms), dtype=torch.long)
    return graph


def export_model(model: torch.nn.Module, path: str | os.PathLike, *, device: str = "cpu") -> str:
    """Trace ``model`` (energy, forces and stress of one structure), export it with dynamic n and E and compile
    it with AOTInductor into ``path`` (written atomically). Returns the path."""
    from potentials import __version__

    path = os.fspath(path)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    graph = example_graph(model).to(device)
    gm = trace(model, graph, forces=True, stress=True, params_as_inputs=False)
    inputs = tuple(graph_inputs(model, graph))
    n, e = torch.export.Dim("num_atoms", min=2), torch.export.Dim("num_edges", min=2)
    dims = {"positions": {0: n}, "species": {0: n}, "batch": {0: n}, "edge_index": {1: e}, "shifts": {0: e}}
    dynamic = tuple(dims.get(k) for k in INPUT_KEYS)
    try:
        program = torch.export.export(gm, inputs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        raise PotentialsError(f"export: torch.export failed for this model ({type(exc).__name__}: {exc})") from exc
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    metadata = {
        "format": FORMAT,
        "atomic_numbers": ",".join(str(z) for z in model.atomic_numbers),
        "r_max": repr(float(model.r_max)),
        "dtype": str(dtype).replace("torch.", ""),
        "inputs": ",".join(INPUT_KEYS),
        "outputs": ",".join(OUTPUT_KEYS),
        "potentials_version": __version__,
    }
    with atomic_path(path) as tmp:  # a half-written package never sits at ``path``
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp), inductor_configs={"aot_inductor.metadata": metadata}
        )
    return path
