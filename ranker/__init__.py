"""The 2D class ranker: features and images from Class2D jobs, the network, scoring and selection."""
