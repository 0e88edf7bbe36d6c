"""Datasets and fast in-memory augmentation."""
