"""mcmoe_vl: Mixture-of-Experts compression (PMQ, ODP, OTP) for language and vision-language models.

Importing the package registers its checkpoint format with transformers (:mod:`mcmoe_vl.hf`), so that
``AutoModelForCausalLM.from_pretrained(dir)`` loads a compressed directory.
"""

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    try:
        from mcmoe_vl.hf import register
    except ImportError:  # transformers missing: nothing to register with
        return
    register()


_register_with_transformers()
