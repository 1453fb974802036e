"""mcmoe_vl: Mixture-of-Experts compression (PMQ, ODP, OTP) for language and vision-language models."""

__version__ = "0.1.0"
