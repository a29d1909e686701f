"""How networks run: plain torch, CUDA graphs, torch.compile, TensorRT; ONNX export and the engine cache.

Nothing here imports ``rtdiffusion``: the pipeline depends on engines, never the reverse.
"""
