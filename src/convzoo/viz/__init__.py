"""Figures: CAC sharp-window masks and per-layer ρ.

Drawn on matplotlib's Agg canvas directly; pyplot and the global backend are left alone.
"""

from convzoo.viz.cac import plot_masks, plot_rho

__all__ = ["plot_masks", "plot_rho"]
