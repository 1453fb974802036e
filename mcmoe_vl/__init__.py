"""mcmoe_vl: Mixture-of-Experts compression (PMQ, ODP, OTP) for language and vision-language models.

Importing the package registers its checkpoint format with transformers (:mod:`mcmoe_vl.hf`), so that
``AutoModelForCausalLM.from_pretrained(dir)`` loads a compressed directory.
"""

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    from mcmoe_vl.hf.hook import install

    install()


_register_with_transformers()


def __getattr__(name: str):  # the one-call API, imported on first use
    if name in ("compress", "CompressedModel"):
        from mcmoe_vl import api

        return getattr(api, name)
    raise AttributeError(f"module 'mcmoe_vl' has no attribute {name!r}")
