"""Names of the compressed checkpoint format, importable without torch or transformers (the transformers
registration hook needs them while transformers itself is being imported)."""

FORMAT = "mcmoe_vl.quantized"
FORMAT_VERSION = 2
QUANT_METHOD = "mcmoe_vl"  # ``quantization_config.quant_method`` in config.json
TENSOR_FILE = "model.safetensors"
MANIFEST_FILE = "quant_manifest.json"
PRUNING_FILE = "pruning.json"  # pruning settings saved in a checkpoint directory are applied on load


class CheckpointError(ValueError):
    """A checkpoint that does not match its manifest or the model; the message names the tensor or file."""
