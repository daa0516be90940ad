"""RELION's file model: STAR tables with optics groups, MRC maps and stacks, atomic writes."""

from .errors import InputError
from .mrc import read_map, read_mrc_header, write_map, write_stack
from .stack import ImageSource, parse_image_name
from .star import ParticleTable, read_particles, read_star, write_particles, write_star

__all__ = [
    "ImageSource",
    "InputError",
    "ParticleTable",
    "parse_image_name",
    "read_map",
    "read_mrc_header",
    "read_particles",
    "read_star",
    "write_map",
    "write_particles",
    "write_stack",
    "write_star",
]
