"""Read the convolution weights of a quantised TFLite model, dequantised to float32, without a TFLite runtime.

The flatbuffer is parsed with the `tflite` package (the schema compiled to Python); no interpreter runs, so nothing
here depends on `tf.lite.Interpreter` (deprecated since TF 2.20). Each `CONV_2D` / `DEPTHWISE_CONV_2D` op becomes
one `ConvWeights` in graph order, already in Keras layout:

- `CONV_2D` weights [out, kh, kw, in] -> Conv2D kernel [kh, kw, in, out];
- `DEPTHWISE_CONV_2D` weights [1, kh, kw, channels] -> DepthwiseConv2D kernel [kh, kw, channels, 1].

Weights dequantise as (q - zero_point) * scale, per tensor or per output channel; biases are int32 with zero point 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlfusion.errors import InputError

CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")
_INTEGER_TYPES = {"INT8": np.int8, "UINT8": np.uint8, "INT32": np.int32}


@dataclass(frozen=True)
class ConvWeights:
    """One convolution of the graph: its op type, Keras-layout kernel and bias (BatchNorm already folded in)."""

    op: str
    kernel: np.ndarray
    bias: np.ndarray


def read_conv_weights(path: str | Path) -> list[ConvWeights]:
    """Every convolution of the TFLite model at `path`, in graph order (InputError when it is not one)."""
    path = Path(path)
    import tflite

    data = path.read_bytes()
    try:
        model = tflite.Model.GetRootAsModel(data, 0)
        graph = model.Subgraphs(0)
        op_names = _op_names(model)
        convs = []
        for index in range(graph.OperatorsLength()):
            operator = graph.Operators(index)
            name = op_names[operator.OpcodeIndex()]
            if name in CONV_OPS:
                kernel, bias = (_dequantised(model, graph, operator.Inputs(i)) for i in (1, 2))
                convs.append(ConvWeights(name, _keras_layout(name, kernel), bias))
    except InputError:
        raise
    except Exception as error:  # a flatbuffer that is not a TFLite model fails anywhere in the accessors
        raise InputError(f"{path}: not a readable TFLite model ({type(error).__name__})") from None
    if not convs:
        raise InputError(f"{path}: no convolutions in this TFLite model")
    return convs


def _op_names(model) -> list[str]:
    import tflite

    by_code = {code: name for name, code in vars(tflite.BuiltinOperator).items() if not name.startswith("_")}
    names = []
    for index in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(index)
        # schema >= 2.4 moved codes above 127 to BuiltinCode; older files keep them in DeprecatedBuiltinCode
        names.append(by_code.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "UNKNOWN"))
    return names


def _dequantised(model, graph, tensor_index: int) -> np.ndarray:
    """The float32 values of a constant quantised tensor."""
    import tflite

    tensor = graph.Tensors(tensor_index)
    type_name = {code: name for name, code in vars(tflite.TensorType).items()}.get(tensor.Type())
    if type_name not in _INTEGER_TYPES:
        raise InputError(f"tensor {tensor.Name().decode()!r}: type {type_name} is not a quantised integer type")
    shape = tuple(int(n) for n in tensor.ShapeAsNumpy())
    raw = model.Buffers(tensor.Buffer()).DataAsNumpy()
    values = np.frombuffer(raw.tobytes(), dtype=_INTEGER_TYPES[type_name]).reshape(shape).astype(np.float32)
    quantization = tensor.Quantization()
    if quantization is None or quantization.ScaleLength() == 0:
        raise InputError(f"tensor {tensor.Name().decode()!r}: no quantisation scale")
    scale = quantization.ScaleAsNumpy().astype(np.float32)
    zero_point = quantization.ZeroPointAsNumpy().astype(np.float32)
    if scale.size > 1:  # per channel along the quantised dimension
        broadcast = [1] * len(shape)
        broadcast[quantization.QuantizedDimension()] = scale.size
        scale, zero_point = scale.reshape(broadcast), zero_point.reshape(broadcast)
    return (values - zero_point) * scale


def _keras_layout(op: str, kernel: np.ndarray) -> np.ndarray:
    if op == "CONV_2D":
        return kernel.transpose(1, 2, 3, 0)
    return kernel[0][..., None]
