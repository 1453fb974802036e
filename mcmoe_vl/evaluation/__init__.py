"""Evaluation through lm-eval (text) and lmms-eval (multimodal) with the compressed model handed over in memory.

The results file schema is :mod:`mcmoe_vl.evaluation.results`.
"""
