"""Datasets: procedural 2D toy densities (:mod:`pyro_nf.data.toy`)."""

from pyro_nf.data.toy import TOY_DATASETS, sample_toy

__all__ = ["TOY_DATASETS", "sample_toy"]
