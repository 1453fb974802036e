"""``mcmoe-vl adapters``: list the registered model adapters (in-tree and plugins)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapters", help="list the registered model adapters (by Hugging Face model_type)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from model_adapters import ADAPTERS

    for name, cls in ADAPTERS.items():
        print(f"{name:<18} {cls.family or cls.__name__}")
    return 0
