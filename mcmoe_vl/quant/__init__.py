"""The quantization engine: packing, quantizers, GPTQ, packed runtimes, model quantization, checkpoints.

Layers, bottom up (each depends only on those above it):

- :mod:`.packing` bit-packing primitives (1/2/3/4 bits into uint8).
- :mod:`.quantizer` per-(row, group) quantizers: asymmetric min-max (2-4 bits), binarisation (1 bit).
- :mod:`.gptq` the GPTQ core as pure functions on tensors, and round-to-nearest.
- :mod:`.packed` / :mod:`.qlinear` the packed tensor type and the modules that run it.
- :mod:`.plan` the bit plan the engine consumes.
- :mod:`.model` / :mod:`.checkpoint` / :mod:`.accounting` model quantization, save/load, bit accounting.
"""
