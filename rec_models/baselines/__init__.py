"""Retrieval baselines without features or towers: most popular and matrix factorisation.

Pure numpy / scipy / ``implicit``; the pairs come from the caller (``orchestration.baselines``
reads them from the samples table), and the metric is the caller's too, so these are
scored by exactly the code that scores the students' embedding tables.
"""
from rec_models.baselines.matrix_factorization import (GRIDS, MFFit, MFSetting, fit_factors, interaction_matrix,
                                                       tune_and_refit)
from rec_models.baselines.popularity import item_click_counts, popularity_vectors

__all__ = ["GRIDS", "MFFit", "MFSetting", "fit_factors", "interaction_matrix", "item_click_counts",
           "popularity_vectors", "tune_and_refit"]
