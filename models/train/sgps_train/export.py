"""ONNX export, onnxruntime verification, int8 variants, parity reference data, manifest."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import lite0
from .synth import ExportWrapper, l2n

log = logging.getLogger("sgps_train.export")
OPSET = 14


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ImageEncoder(nn.Module):
    """image [B,3,H,W] -> L2-normalised embedding [B,1280].

    embedding = normalize(g(features) - center), g = sqrt if `power` else identity. `center` is a
    constant computed on base-class images (zeros = plain normalised features).
    """

    def __init__(self, backbone: lite0.Lite0, center: torch.Tensor | None = None, power: bool = False):
        super().__init__()
        self.backbone = backbone
        c = torch.zeros(lite0.FEATURE_DIM) if center is None else center.detach().clone().float()
        self.register_buffer("center", c)
        self.power = power

    def post(self, f):
        if self.power:
            f = torch.sqrt(f + 1e-6)
        return l2n(f - self.center)

    def forward(self, image):
        return self.post(self.backbone.features(image))


def _export(module, args, path: Path, input_names, output_names, dynamic_axes):
    module.eval()
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    import onnx

    m = onnx.load(str(path))
    onnx.checker.check_model(m)


def export_image_encoder(enc: ImageEncoder, path: Path, size: int = 224):
    x = torch.randn(2, 3, size, size)
    _export(enc, (x,), path, ["image"], ["embedding"], {"image": {0: "batch"}, "embedding": {0: "batch"}})


def export_text_encoder(model, path: Path):
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.int64)
    mask = (ids != 0).long()
    typ = torch.zeros_like(ids)
    axes = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "seq"},
        "token_type_ids": {0: "batch", 1: "seq"},
        "embedding": {0: "batch"},
    }
    _export(model, (ids, mask, typ), path, ["input_ids", "attention_mask", "token_type_ids"], ["embedding"], axes)


def export_synth(wrapper, path: Path, dim: int, text_dim: int):
    n, k = 3, 2
    args = (
        torch.randn(n, k, dim),
        torch.ones(n, k),
        torch.randn(n, text_dim),
        torch.ones(n),
    )
    axes = {
        "support": {0: "N", 1: "K"},
        "support_mask": {0: "N", 1: "K"},
        "text": {0: "N"},
        "text_mask": {0: "N"},
        "weight": {0: "N"},
        "bias": {0: "N"},
    }
    _export(
        wrapper,
        args,
        path,
        ["support", "support_mask", "text", "text_mask"],
        ["weight", "bias", "scale"],
        axes,
    )


def export_synth_checked(g, path: Path, ref_dir: Path, text3: np.ndarray) -> None:
    """Export G to `path` (written whole or not at all), check onnxruntime against PyTorch on a
    small task (3 classes, one with a masked shot, one without text) and on a text-only task, and
    write that task as the synthesizer parity reference (`ref_dir/synth*.npy`, `synth.json`).
    `text3`: three text embeddings [3, T] from the shipped text encoder."""
    wrapper = ExportWrapper(g).eval()
    dim = g.dim
    tmp = path.with_name(path.name + ".tmp")
    export_synth(wrapper, tmp, dim, text3.shape[1])
    rng = np.random.default_rng(3)
    n, k = 3, 2
    sup = rng.standard_normal((n, k, dim)).astype(np.float32)
    sup /= np.linalg.norm(sup, axis=-1, keepdims=True)
    sm = np.ones((n, k), np.float32)
    sm[2, 1] = 0.0
    sup[2, 1] = 0.0
    txt = np.asarray(text3[:n], np.float32).copy()
    tm = np.asarray([1, 0, 1], np.float32)
    txt[1] = 0.0
    with torch.no_grad():
        tw, tb, ts = (t.numpy() for t in wrapper(*(torch.from_numpy(a) for a in (sup, sm, txt, tm))))
    sess = ort_session(tmp)
    ow, ob, osc = sess.run(["weight", "bias", "scale"], {"support": sup, "support_mask": sm, "text": txt, "text_mask": tm})
    err = max(np.abs(tw - ow).max(), np.abs(tb - ob).max(), np.abs(ts - osc).max())
    log.info("synthesizer onnxruntime vs torch: max abs diff %.2e", err)
    if err > 1e-3:
        raise RuntimeError(f"synthesizer ONNX disagrees with PyTorch (max abs diff {err})")
    # K = 0 (text only) must run too
    z = sess.run(["weight"], {"support": np.zeros((n, 1, dim), np.float32), "support_mask": np.zeros((n, 1), np.float32),
                              "text": np.asarray(text3[:n], np.float32), "text_mask": np.ones(n, np.float32)})[0]
    if not np.isfinite(z).all():
        raise RuntimeError("synthesizer gives non-finite weights for a text-only task")
    tmp.replace(path)
    names = ("support", "support_mask", "text", "text_mask", "weight", "bias", "scale")
    for name, arr in zip(names, (sup, sm, txt, tm, ow, ob, osc)):
        save_npy(ref_dir / f"synth_{name}.npy", arr)
    write_json(ref_dir / "synth.json", {k: f"synth_{k}.npy" for k in names})


def quantize_text_int8(fp32: Path, out: Path):
    """Dynamic int8 (DynamicQuantizeLinear + MatMulInteger); the embedding tables are stored int8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(fp32),
        str(out),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gather"],
        per_channel=True,  # per-tensor loses too much (mean cosine 0.95 vs 0.99 to fp32)
    )


def text_f16_weights(fp32: Path, out: Path, min_elems: int = 4096) -> int:
    """The text encoder for tract: fp32 arithmetic throughout (no dynamic activation quantization,
    which tract runs 4x slower than onnxruntime), the matrix-multiply weights stored float16 with a
    Cast to float32 (tract folds it at load, so the board holds fp32 weights), and the embedding
    tables stored int8 + DequantizeLinear (a gather: exact enough and a third of the file).
    Returns how many weights were stored float16. Written whole or not at all."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = out.with_name(out.name + ".tmp")
    quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["Gather"])
    m = onnx.load(str(tmp))
    users: dict[str, set[str]] = {}
    for n in m.graph.node:
        for i in n.input:
            users.setdefault(i, set()).add(n.op_type)
    inits, casts = [], []
    for init in m.graph.initializer:
        if init.data_type == TensorProto.FLOAT and int(np.prod(init.dims)) >= min_elems and users.get(init.name) == {"MatMul"}:
            h = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "_f16")
            inits.append(h)
            casts.append(helper.make_node("Cast", [h.name], [init.name], to=TensorProto.FLOAT, name=init.name + "_to_f32"))
        else:
            inits.append(init)
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(casts + nodes)
    onnx.checker.check_model(m)
    onnx.save(m, str(tmp))
    tmp.replace(out)
    return len(casts)


class _Calib:
    def __init__(self, batches: list[np.ndarray], name: str):
        self.it = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self.it, None)

    def rewind(self):  # pragma: no cover
        pass


def quantize_image_int8(fp32: Path, out: Path, calib_batches: list[np.ndarray]):
    """Static int8 in operator form (QLinearConv / QLinearMatMul), calibrated on base images."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.c = _Calib(calib_batches, "image")

        def get_next(self):
            return self.c.get_next()

    quantize_static(
        str(fp32),
        str(out),
        Reader(),
        quant_format=QuantFormat.QOperator,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
        # Clip must be included: it is folded into QLinearConv's output range. With Conv alone the
        # conv output is quantised over its full pre-ReLU6 range (mean cosine to fp32 0.69 -> 0.98).
        op_types_to_quantize=["Conv", "Clip"],
    )


def ort_session(path: Path):
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


def save_npy(path: Path, arr: np.ndarray):
    np.save(str(path), np.ascontiguousarray(arr.astype("<f4")))


def file_entry(path: Path, root: Path) -> dict:
    return {"file": str(path.relative_to(root)), "sha256": sha256(path), "bytes": path.stat().st_size}


def write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
