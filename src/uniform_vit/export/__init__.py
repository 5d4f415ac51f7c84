"""Deployment: ONNX / TorchScript / ExecuTorch export of the fused model, parity checks, int8 and measurements.

- ``export.onnx``: ``export_onnx(model, path, input_size, opset, dynamic_batch, align_channels)``, ``check_onnx``,
  ``OrtRunner`` (onnxruntime session as a callable), ``max_abs_diff``, ``simplify_onnx``, ``align_stem_channels``
- ``export.quant``: ``quantize_int8(fp32_path, out_path, calib_batches)`` (onnxruntime static QDQ int8)
- ``export.torchscript``, ``export.executorch``: the other formats
- ``export.images``: real images (folder or built-in dataset) with the model's preprocessing
- ``export.bench``: the int8 study, parity table and per-runtime peak memory behind benchmarks/export.md

Submodules are imported on use so ``import uniform_vit`` never needs onnx or onnxruntime.
"""
