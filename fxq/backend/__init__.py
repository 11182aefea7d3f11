"""The quantization engine behind fxq: the only package that imports torch.ao.quantization."""
