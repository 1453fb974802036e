"""Export a compressed checkpoint to formats other engines read (see docs/interop.md for which engine reads what).

- :mod:`.modules`: the checkpoint's weights as a flat list of named linears (packed codes or dense), with fused
  experts split into one gate / up / down per expert, named as the model family's hub checkpoints name them.
- :mod:`.compressed_tensors`: compressed-tensors ``pack-quantized`` (per-group int weights, 1-8 bits).
"""
