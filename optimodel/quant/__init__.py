"""Support for the `quantize` pass, around `onnxruntime.quantization`.

ONNX Runtime's quantizers do the rewriting; this package holds what they leave to the
caller: feeding calibration data from optimodel's data layouts (`calibration`), getting a
model into a shape they accept (`prepare`), knowing which quantized ops each execution
provider can run (`targets`), and saying afterwards what really runs in integer
arithmetic and how many bytes the weights take (`stats`).
"""
