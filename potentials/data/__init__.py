"""Data: the graph container, neighbour lists, datasets and statistics."""

from potentials.data.graph import AtomicGraph, collate  # noqa: F401
from potentials.data.neighbors import atoms_to_graph, neighbor_list  # noqa: F401
