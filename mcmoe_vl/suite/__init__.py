"""Benchmark suites: the suite file schema, its loader and preflight checks, stage caching, and the runner.

Entry points: :func:`mcmoe_vl.suite.load.load_suite`, :func:`mcmoe_vl.suite.runner.run_suite`.
"""
