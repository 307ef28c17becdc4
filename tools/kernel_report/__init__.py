"""Helpers of tools/kernel-report: the occupancy calculator and the launch table."""
