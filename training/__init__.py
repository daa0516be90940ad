"""Training of the class ranker (PyTorch Lightning): data modules, corpus building, EMPIAR-10812 reader."""
