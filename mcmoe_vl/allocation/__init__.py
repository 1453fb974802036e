"""PMQ bit allocation: the integer program of MC-MoE Eq. 4, its global form, and the baseline allocators.

Entry point: :func:`mcmoe_vl.allocation.allocate.allocate` (statistics + config -> bit plan).
"""
