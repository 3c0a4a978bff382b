"""Serving: ONNX export of the encoders (`export`) and INT8 quantization / magnitude pruning (`quantize`)."""
