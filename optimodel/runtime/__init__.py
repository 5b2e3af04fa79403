"""ONNX Runtime: sessions, providers and (later) latency measurement."""
