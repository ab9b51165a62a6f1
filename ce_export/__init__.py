"""ce_export: compile Mixture-of-Experts (and Compressed-Experts) language models to ONNX and TensorRT."""

__version__ = "0.1.0"
