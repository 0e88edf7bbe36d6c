"""Tests of convzoo.viz (a package so its module names do not clash with tests/ops)."""
