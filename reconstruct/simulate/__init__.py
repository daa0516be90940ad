"""Ground-truth simulation: maps from atomic models, particle stacks and micrograph movies.

Everything is deterministic for a given seed and writes a RELION-style project (STAR + MRC) with
the truth (maps, poses, labels, coordinates, drift) beside it, under ``truth/``.
"""

from .density import atomic_model_map, morph_maps
from .movies import MovieSimulation, simulate_movies
from .particles import ParticleSimulation, simulate_particles

__all__ = [
    "MovieSimulation",
    "ParticleSimulation",
    "atomic_model_map",
    "morph_maps",
    "simulate_movies",
    "simulate_particles",
]
