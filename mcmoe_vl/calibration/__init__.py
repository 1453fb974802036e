"""Calibration: expert significance statistics, Hessian traces, ODP ratio quantiles and the eps table.

Entry point: :func:`mcmoe_vl.calibration.calibrate.calibrate`. The file schema is :mod:`.stats` (no torch import).
"""
