"""Datasets, preprocessing (``prepare``), folds and episode samplers."""
