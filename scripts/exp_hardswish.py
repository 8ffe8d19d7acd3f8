"""Issue 18 experiment: fastest integer-friendly HardSwish form inside a static int8 QDQ model (ORT CPU EP).

Stages (all outputs under --dir, default /tmp/hswish):
  build     MobileNetV3-small-style torch model (random init, BN stats recalibrated on images, random BN
            affine so HardSwish inputs cover both knees), export opset 17 (dynamic batch), calib/test npz
  quantize  onnxcompress static int8 + ORT quantize_static (QDQ per-channel)
  variants  rewrite every HardSwish of the quantized model into variants a..f
  bench     interleaved latency (1/2 threads, batch 1/8) + fidelity vs fp32 + per-node profile
Run: python scripts/exp_hardswish.py all
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

D = Path(os.environ.get("HSWISH_DIR", "/tmp/hswish"))
MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


# ----------------------------------------------------------------------------- build
def _model():
    import torch
    from torch import nn

    def md(v, d=8):
        n = max(d, int(v + d / 2) // d * d)
        return n + d if n < 0.9 * v else n

    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            s = md(c // 4)
            self.fc1, self.fc2 = nn.Conv2d(c, s, 1), nn.Conv2d(s, c, 1)
            self.act, self.gate = nn.ReLU(), nn.Hardsigmoid()

        def forward(self, x):
            s = torch.nn.functional.adaptive_avg_pool2d(x, 1)
            return x * self.gate(self.fc2(self.act(self.fc1(s))))

    def cba(i, o, k, s, g, act):
        return [nn.Conv2d(i, o, k, s, (k - 1) // 2, groups=g, bias=False), nn.BatchNorm2d(o), act()] if act else \
               [nn.Conv2d(i, o, k, s, (k - 1) // 2, groups=g, bias=False), nn.BatchNorm2d(o)]

    class IR(nn.Module):
        def __init__(self, i, k, e, o, se, hs, s):
            super().__init__()
            A = nn.Hardswish if hs else nn.ReLU
            L = [] if e == i else cba(i, e, 1, 1, 1, A)
            L += cba(e, e, k, s, e, A)
            if se:
                L.append(SE(e))
            L += cba(e, o, 1, 1, 1, None)
            self.b, self.res = nn.Sequential(*L), (s == 1 and i == o)

        def forward(self, x):
            y = self.b(x)
            return x + y if self.res else y

    cfg = [(16, 3, 16, 16, 1, 0, 2), (16, 3, 72, 24, 0, 0, 2), (24, 3, 88, 24, 0, 0, 1), (24, 5, 96, 40, 1, 1, 2),
           (40, 5, 240, 40, 1, 1, 1), (40, 5, 240, 40, 1, 1, 1), (40, 5, 120, 48, 1, 1, 1), (48, 5, 144, 48, 1, 1, 1),
           (48, 5, 288, 96, 1, 1, 2), (96, 5, 576, 96, 1, 1, 1), (96, 5, 576, 96, 1, 1, 1)]

    class MNV3S(nn.Module):
        def __init__(self):
            super().__init__()
            L = cba(3, 16, 3, 2, 1, nn.Hardswish) + [IR(*c) for c in cfg] + cba(96, 576, 1, 1, 1, nn.Hardswish)
            self.features = nn.Sequential(*L)
            self.head = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(), nn.Linear(1024, 1000))

        def forward(self, x):
            return self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))

    return MNV3S()


def _images():
    import skimage.data as sd
    from skimage.transform import resize
    out = {}
    for n in ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "horse", "brick", "grass", "gravel",
              "moon", "page", "text", "clock", "colorwheel", "hubble_deep_field", "immunohistochemistry", "logo",
              "cell", "eagle", "lily"]:
        try:
            im = np.asarray(getattr(sd, n)())
        except Exception:  # noqa: BLE001 (needs a download)
            continue
        if im.dtype == bool:
            im = im.astype(np.uint8) * 255
        if im.ndim == 2:
            im = np.stack([im] * 3, -1)
        im = im[..., :3]
        if im.ndim != 3 or min(im.shape[:2]) < 64:
            continue
        out[n] = im.astype(np.float32) / (255.0 if im.max() > 1.5 else 1.0)
    return out


def _crops(im, n, rng):
    from skimage.transform import resize
    h, w = im.shape[:2]
    res = []
    for j in range(n):
        s = int(min(h, w) * (1.0 if j == 0 else rng.uniform(0.5, 1.0)))
        y, x = (h - s) // 2, (w - s) // 2
        if j:
            y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        c = resize(im[y:y + s, x:x + s], (224, 224), anti_aliasing=True).transpose(2, 0, 1).astype(np.float32)
        if j % 2:
            c = c[:, :, ::-1]
        res.append((c - MEAN) / STD)
    return res


def build():
    import torch
    D.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ims = _images()
    names = sorted(ims)
    test_names = names[::4]                      # held-out images for fidelity
    cal_names = [n for n in names if n not in test_names]
    calib = np.stack([c for n in cal_names for c in _crops(ims[n], 4, rng)])
    test = np.stack([c for n in test_names for c in _crops(ims[n], 2, rng)])
    np.savez(D / "calib.npz", input=calib)
    np.savez(D / "test.npz", input=test)
    print("images", names, "calib", calib.shape, "test", test.shape, "test imgs", test_names)
    torch.manual_seed(0)
    m = _model()
    for mod in m.modules():  # random BN affine so activations sit on both sides of HardSwish's knees
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 2.0)
            mod.bias.data.normal_(0.0, 1.0)
            mod.momentum = None  # cumulative average
    m.train()
    with torch.no_grad():  # BN recalibration (realistic activation statistics)
        for i in range(0, len(calib), 8):
            m(torch.from_numpy(calib[i:i + 8]))
    m.eval()
    x = torch.from_numpy(test[:1])
    for dyn, tag in [(False, "ts"), (True, "dynamo")]:
        try:
            kw = dict(dynamo=dyn, opset_version=17, input_names=["input"], output_names=["logits"])
            if not dyn:  # (dynamo: static shape, only checked for which ops it emits)
                kw["dynamic_axes"] = {"input": {0: "N"}, "logits": {0: "N"}}
            torch.onnx.export(m, (x,), str(D / f"m_{tag}.onnx"), **kw)
            import onnx
            g = onnx.load(str(D / f"m_{tag}.onnx"))
            ops = {}
            for nd in g.graph.node:
                ops[nd.op_type] = ops.get(nd.op_type, 0) + 1
            print(f"exporter {tag}: ops {ops}")
        except Exception as e:  # noqa: BLE001
            print(f"exporter {tag} failed: {type(e).__name__}: {str(e)[:300]}")
    # the model used below: the TorchScript export (or dynamo if that failed)
    src = D / "m_ts.onnx" if (D / "m_ts.onnx").exists() else D / "m_dynamo.onnx"
    (D / "m.onnx").write_bytes(src.read_bytes())



# ----------------------------------------------------------------------------- quantize
def quantize():
    """onnxcompress static int8 (all nodes quantized: no fallback, random net -> gate floor off) + ORT's."""
    subprocess.run(["onnxcompress", "optimize", str(D / "m.onnx"), "-o", str(D / "m.static.onnx"), "--quantize", "static",
                    "--calibration", str(D / "calib.npz"), "--no-fallback", "--accept-degraded", "-q"], check=True)
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class R(CalibrationDataReader):
        def __init__(self):
            self.d = iter([{"input": x[None]} for x in np.load(D / "calib.npz")["input"]])

        def get_next(self):
            return next(self.d, None)
    quant_pre_process(str(D / "m.onnx"), str(D / "m.pre.onnx"))  # inlines HardSwish -> HardSigmoid + Mul
    quantize_static(str(D / "m.pre.onnx"), str(D / "m.ortq.onnx"), R(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


# ----------------------------------------------------------------------------- variants
def hswish(x):
    return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0


def hsig(x):
    return np.clip(x / 6.0 + 0.5, 0.0, 1.0)


def _q(y, s, z):
    return np.clip(np.round(y / np.float32(s)) + int(z), 0, 255).astype(np.uint8)


class G:
    """Tiny onnx-proto graph editor."""

    def __init__(self, m):
        import onnx
        self.m, self.g = m, m.graph
        self.n = 0
        self.reindex()

    def reindex(self):
        from collections import defaultdict
        self.init = {i.name: i for i in self.g.initializer}
        self.prod = {o: n for n in self.g.node for o in n.output}
        self.cons = defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                self.cons[i].append(n)

    def arr(self, name):
        from onnx import numpy_helper as nh
        return nh.to_array(self.init[name])

    def const(self, base, a):
        from onnx import numpy_helper as nh
        self.n += 1
        name = f"{base}__c{self.n}"
        self.g.initializer.append(nh.from_array(np.asarray(a), name))
        self.init[name] = self.g.initializer[-1]
        return name

    def name(self, base):
        self.n += 1
        return f"{base}__v{self.n}"


def _nd(op, ins, outs, name, **attrs):
    from onnx import helper as oh
    dom = attrs.pop("domain", "")
    return oh.make_node(op, ins, outs, name=name, domain=dom, **attrs)


def normalize(m):
    """a+: every HardSwish as DQ -> HardSwish -> Q (a Q/DQ pair added where the quantizer left its output float,
    i.e. before SE's GlobalAveragePool + Mul); SE HardSigmoid outputs get Q(1/255, 0)/DQ so SE's Mul is QLinearMul."""
    g = G(m)
    new = []
    for n in list(g.g.node):
        new.append(n)
        if n.op_type not in ("HardSwish", "HardSigmoid") or not n.name.startswith("/features"):
            continue
        cs = g.cons[n.output[0]]
        if len(cs) == 1 and cs[0].op_type == "QuantizeLinear":
            continue
        if n.op_type == "HardSwish":
            dq = g.prod[n.input[0]]
            sx, zx = float(g.arr(dq.input[1])), int(g.arr(dq.input[2]))
            ys = hswish((np.arange(256, dtype=np.float32) - zx) * np.float32(sx))
            lo, hi = min(0.0, float(ys.min())), max(0.0, float(ys.max()))
            sy = np.float32((hi - lo) / 255.0)
            zy = np.uint8(np.clip(round(-lo / sy), 0, 255))
        else:
            sy, zy = np.float32(1.0 / 255.0), np.uint8(0)
        yq, ydq = g.name(n.output[0] + "_q"), g.name(n.output[0] + "_dq")
        s_, z_ = g.const(n.name + "_ys", sy), g.const(n.name + "_yz", zy)
        new.append(_nd("QuantizeLinear", [n.output[0], s_, z_], [yq], yq))
        new.append(_nd("DequantizeLinear", [yq, s_, z_], [ydq], ydq))
        for c in cs:
            for k, i in enumerate(c.input):
                if i == n.output[0]:
                    c.input[k] = ydq
    del g.g.node[:]
    g.g.node.extend(new)
    return m


def rewrite(m, variant):
    """Replace each '/features' DQ -> HardSwish -> Q (after normalize) by the variant's form."""
    from onnx import TensorProto
    g = G(m)
    new, drop = [], set()
    for n in list(g.g.node):
        if n.op_type != "HardSwish" or not n.name.startswith("/features"):
            new.append(n)
            continue
        dq = g.prod[n.input[0]]
        q = g.cons[n.output[0]][0]
        assert dq.op_type == "DequantizeLinear" and q.op_type == "QuantizeLinear", n.name
        xq, sxn, zxn = dq.input
        syn, zyn = q.input[1], q.input[2]
        sx, zx, sy, zy = float(g.arr(sxn)), int(g.arr(zxn)), float(g.arr(syn)), int(g.arr(zyn))
        yq = q.output[0]
        dq_alone = len(g.cons[dq.output[0]]) == 1
        k = np.arange(256, dtype=np.float32)
        xd = (k - zx) * np.float32(sx)
        nm = n.name
        if variant == "d":  # float Conv output straight into HardSwish (no Q/DQ between Conv and HardSwish)
            qc = g.prod[xq]
            if qc.op_type == "QuantizeLinear" and len(g.cons[xq]) == 1 and dq_alone:
                n.input[0] = qc.input[0]
                drop.update([id(qc), id(dq)])
            new.append(n)
            continue
        if dq_alone:
            drop.add(id(dq))
        drop.add(id(q))
        idx = g.name(nm + "_idx")
        if variant == "b":  # y_q = table[x_q]
            tbl = g.const(nm + "_lut", _q(hswish(xd), sy, zy))
            new += [_nd("Cast", [xq], [idx], idx, to=TensorProto.INT32), _nd("Gather", [tbl, idx], [yq], nm + "_gather", axis=0)]
            continue
        xa, xm, h, hq = g.name(nm + "_xa"), g.name(nm + "_xm"), g.name(nm + "_h"), g.name(nm + "_hq")
        new += [_nd("DequantizeLinear", [xq, sxn, zxn], [xm], xm)]
        if variant == "c1":  # QLinearAdd(x, 3) -> Q(6/255, 0) saturates = Clip(0, 6); DQ with 1/255 = /6; QLinearMul
            three, a = g.name(nm + "_3"), g.name(nm + "_add")
            new += [_nd("DequantizeLinear", [xq, sxn, zxn], [xa], xa),
                    _nd("DequantizeLinear", [g.const(nm + "_3q", np.uint8(1)), g.const(nm + "_3s", np.float32(3.0)),
                                             g.const(nm + "_3z", np.uint8(0))], [three], three),
                    _nd("Add", [xa, three], [a], a),
                    _nd("QuantizeLinear", [a, g.const(nm + "_hs6", np.float32(6.0 / 255.0)), g.const(nm + "_hz6", np.uint8(0))], [hq], hq)]
        elif variant == "c2":  # HardSigmoid in a DQ/Q sandwich (what ORT's quantize_static writes)
            hs_ = g.name(nm + "_hsig")
            new += [_nd("DequantizeLinear", [xq, sxn, zxn], [xa], xa),
                    _nd("HardSigmoid", [xa], [hs_], hs_, alpha=1.0 / 6.0, beta=0.5),
                    _nd("QuantizeLinear", [hs_, g.const(nm + "_hs1", np.float32(1.0 / 255.0)), g.const(nm + "_hz1", np.uint8(0))], [hq], hq)]
        elif variant == "c3":  # HardSigmoid as a lookup table
            tbl = g.const(nm + "_lut", _q(hsig(xd), 1.0 / 255.0, 0))
            new += [_nd("Cast", [xq], [idx], idx, to=TensorProto.INT32), _nd("Gather", [tbl, idx], [hq], nm + "_gather", axis=0)]
        else:
            raise ValueError(variant)
        new += [_nd("DequantizeLinear", [hq, g.const(nm + "_h1", np.float32(1.0 / 255.0)), g.const(nm + "_hz", np.uint8(0))], [h], h),
                _nd("Mul", [xm, h], [g.name(nm + "_mul")], nm + "_mul")]
        new += [_nd("QuantizeLinear", [new[-1].output[0], syn, zyn], [yq], yq)]
    kept = [n for n in new if id(n) not in drop]
    del g.g.node[:]
    g.g.node.extend(kept)
    return m


VARIANTS = ["a", "a+", "b", "c1", "c2", "c3", "d"]


def variants():
    import onnx
    for v in VARIANTS:
        m = onnx.load(str(D / "m.static.onnx"))
        if v != "a":
            m = normalize(m)
        if v not in ("a", "a+"):
            m = rewrite(m, v)
        onnx.checker.check_model(m)
        onnx.save(m, str(D / f"v_{v}.onnx"))
    # the same rewrites of ORT's quantize_static output are not needed: it is variant c2 already (checked in report)


def _sess(path, threads, prof=None, opt_out=None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    if prof:
        so.enable_profiling, so.profile_file_prefix = True, prof
    if opt_out:
        so.optimized_model_filepath = opt_out
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


MODELS = {"fp32": "m.onnx", **{v: f"v_{v}.onnx" for v in VARIANTS}, "ortq(c2-like)": "m.ortq.onnx"}


def opt_graphs():
    """What ORT (ORT_ENABLE_ALL) turns each variant into."""
    import onnx
    from collections import Counter
    res = {}
    for k, f in MODELS.items():
        out = D / f"opt_{f}"
        _sess(D / f, 1, opt_out=str(out))
        c = Counter((n.domain + ":" if n.domain else "") + n.op_type for n in onnx.load(str(out)).graph.node)
        res[k] = dict(sorted(c.items()))
        print(f"{k:>14}: {res[k]}")
    return res


def fidelity():
    """logits cosine / top-1 vs fp32 on the held-out test crops; per-layer HardSwish error in output-scale units."""
    test = np.load(D / "test.npz")["input"]
    ref = _sess(D / "m.onnx", 2).run(None, {"input": test})[0]
    res = {}
    for k, f in MODELS.items():
        if k == "fp32":
            continue
        y = _sess(D / f, 2).run(None, {"input": test})[0]
        cos = (y * ref).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)
        res[k] = dict(cos_mean=float(cos.mean()), cos_min=float(cos.min()),
                      top1=float((y.argmax(1) == ref.argmax(1)).mean() * 100), top5_of_ref_in_top5=float(np.mean(
                          [len(set(np.argsort(-a)[:5]) & set(np.argsort(-b)[:5])) / 5 for a, b in zip(y, ref)]) * 100))
    res.update(layer_errors())
    for k, v in res.items():
        print(f"{k:>14}: {v}")
    return res


def layer_errors():
    """Run each variant's HardSwish replacement (one layer at a time, the layer's own scales) on all 256 input
    codes through ORT (fused kernels as in the model) and compare with hswish(DQ(x)): max |err| / s_y."""
    import onnx
    from onnx import TensorProto, helper as oh
    base = normalize(onnx.load(str(D / "m.static.onnx")))
    g = G(base)
    out = {}
    for v in ["a+", "b", "c1", "c2", "c3"]:
        worst, worst_abs = 0.0, 0.0
        for n in g.g.node:
            if n.op_type != "HardSwish" or not n.name.startswith("/features"):
                continue
            dq, q = g.prod[n.input[0]], g.cons[n.output[0]][0]
            sx, zx, sy, zy = (float(g.arr(dq.input[1])), int(g.arr(dq.input[2])), float(g.arr(q.input[1])), int(g.arr(q.input[2])))
            # mini model: x_q[1,1,16,16] -> DQ -> HardSwish -> Q -> y_q, rewritten by the variant
            inits = [onnx.numpy_helper.from_array(np.float32(sx), "sx"), onnx.numpy_helper.from_array(np.uint8(zx), "zx"),
                     onnx.numpy_helper.from_array(np.float32(sy), "sy"), onnx.numpy_helper.from_array(np.uint8(zy), "zy")]
            # a uint8 Identity producer so the DQ's input is not a graph input (mirrors the model)
            nodes = [oh.make_node("Identity", ["xin"], ["xq"]), oh.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dq"),
                     oh.make_node("HardSwish", ["xd"], ["h"], name="/features/x"), oh.make_node("QuantizeLinear", ["h", "sy", "zy"], ["yq"], name="q"),
                     oh.make_node("Identity", ["yq"], ["y"])]
            mm = oh.make_model(oh.make_graph(nodes, "t", [oh.make_tensor_value_info("xin", TensorProto.UINT8, [1, 1, 16, 16])],
                                             [oh.make_tensor_value_info("y", TensorProto.UINT8, [1, 1, 16, 16])], inits),
                               opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("com.microsoft", 1)])
            if v != "a+":
                mm = rewrite(mm, v)
            import onnxruntime as ort
            so = ort.SessionOptions()
            so.log_severity_level = 3
            s = ort.InferenceSession(mm.SerializeToString(), so, providers=["CPUExecutionProvider"])
            k = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
            y = s.run(None, {"xin": k})[0].ravel().astype(np.float32)
            yd = (y - zy) * sy
            ex = hswish((np.arange(256, dtype=np.float32) - zx) * np.float32(sx))
            ex_c = np.clip(ex, (0 - zy) * sy, (255 - zy) * sy)  # the output range is part of the quantizer's choice
            worst = max(worst, float(np.abs(yd - ex_c).max() / sy))
            worst_abs = max(worst_abs, float(np.abs(yd - ex_c).max()))
        out[f"layer_err[{v}]"] = dict(max_err_in_out_steps=round(worst, 3), max_abs_err=round(worst_abs, 4))
    return out


def _bench_round(sessions, feed, n):
    t = {}
    for k, s in sessions.items():
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            s.run(None, feed)
            ts.append(time.perf_counter() - t0)
        t[k] = ts
    return t


def bench(rounds="15"):
    rounds = int(rounds)
    test = np.load(D / "test.npz")["input"]
    res = {}
    for threads in (1, 2):
        for batch in (1, 8):
            feed = {"input": np.ascontiguousarray(test[:batch])}
            ss = {k: _sess(D / f, threads) for k, f in MODELS.items()}
            for s in ss.values():
                for _ in range(5):
                    s.run(None, feed)
            allt = {k: [] for k in ss}
            n = 20 if batch == 1 else 4
            for r in range(rounds):  # interleaved: every round runs every model n times, order rotated
                keys = list(ss)
                keys = keys[r % len(keys):] + keys[:r % len(keys)]
                t = _bench_round({k: ss[k] for k in keys}, feed, n)
                for k in t:
                    allt[k] += t[k]
            med = {k: float(np.median(v) * 1e3) for k, v in allt.items()}
            for k in med:
                res[f"t{threads}_b{batch}:{k}"] = dict(ms=round(med[k], 3), speed_vs_fp32=round(med["fp32"] / med[k], 3),
                                                        p10=round(float(np.percentile(allt[k], 10) * 1e3), 3),
                                                        p90=round(float(np.percentile(allt[k], 90) * 1e3), 3))
            print(f"threads={threads} batch={batch} ({len(allt['fp32'])} runs each):")
            for k in med:
                print(f"   {k:>14}: {med[k]:8.3f} ms   fp32/this = {med['fp32'] / med[k]:.3f}")
    json.dump(res, open(D / "bench.json", "w"), indent=1)
    return res


def profile():
    """Per-op-type share of node time (ORT profiler), 1 thread, batch 1 and 8."""
    import glob
    test = np.load(D / "test.npz")["input"]
    res = {}
    for batch in (1, 8):
        feed = {"input": test[:batch]}
        for k in ["fp32", "a", "a+", "b", "c1", "c2", "c3", "d"]:
            s = _sess(D / MODELS[k], 1, prof=str(D / f"prof_{k.replace('+', 'p')}_b{batch}"))
            for _ in range(30 if batch == 1 else 8):
                s.run(None, feed)
            pf = s.end_profiling()
            ev = json.load(open(pf))
            tot, per = 0.0, {}
            hsn = {}
            for e in ev:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    op = e["args"].get("op_name", "?")
                    per[op] = per.get(op, 0) + e["dur"]
                    tot += e["dur"]
                    nm = e["name"][:-len("_kernel_time")]
                    if "HardSwish" in nm or "hsig" in nm or "_gather" in nm or "_mul" in nm or "_idx" in nm or "_add" in nm or "_hq" in nm:
                        hsn[op] = hsn.get(op, 0) + e["dur"]
            os.remove(pf)
            share = {op: round(v / tot * 100, 1) for op, v in sorted(per.items(), key=lambda x: -x[1])}
            hs_share = round(sum(hsn.values()) / tot * 100, 1)
            res[f"b{batch}:{k}"] = dict(share_pct=share, hardswish_nodes_pct=hs_share, hardswish_by_op={o: round(v / tot * 100, 1) for o, v in hsn.items()})
            # (name filter misses ORT-inlined HardSwish nodes in a/a+/d: read the per-op shares instead)
            print(f"b{batch} {k:>3}: name-matched HardSwish nodes {hs_share:5.1f}%  {share}")
    json.dump(res, open(D / "profile.json", "w"), indent=1)


def contrib():
    """Do com.microsoft integer HardSwish / HardSigmoid / lookup kernels exist in this ORT build?"""
    import onnxruntime as ort
    from onnx import TensorProto, helper as oh
    res = {}
    for op in ["QLinearHardSwish", "QLinearHardSigmoid", "QLinearLookup", "QLinearSigmoid", "QLinearLeakyRelu"]:
        ins = ["x", "s", "z", "s", "z"]
        inits = [oh.make_tensor("s", TensorProto.FLOAT, [], [0.1]), oh.make_tensor("z", TensorProto.UINT8, [], [128])]
        nd = oh.make_node(op, ins, ["y"], domain="com.microsoft")
        m = oh.make_model(oh.make_graph([nd], "t", [oh.make_tensor_value_info("x", TensorProto.UINT8, [4])],
                                        [oh.make_tensor_value_info("y", TensorProto.UINT8, [4])], inits),
                          opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("com.microsoft", 1)])
        try:
            s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            s.run(None, {"x": np.array([0, 100, 128, 255], np.uint8)})
            res[op] = "exists"
        except Exception as e:  # noqa: BLE001
            res[op] = "missing: " + str(e).split("\n")[0][:120]
        print(f"{op}: {res[op]}")
    return res


def report():
    res = dict(cpu=_cpu(), contrib=contrib(), optimized_ops=opt_graphs(), fidelity=fidelity())
    json.dump(res, open(D / "report.json", "w"), indent=1)


def _cpu():
    txt = open("/proc/cpuinfo").read()
    flags = set(txt.split("flags")[1].split("\n")[0].split())
    name = [ln for ln in txt.splitlines() if ln.startswith("model name")][0].split(":")[1].strip()
    import onnxruntime as ort
    r = dict(model=name, cpus=os.cpu_count(), ort=ort.__version__,
             flags={f: f in flags for f in ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]})
    print(r)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["build", "quantize", "variants", "report", "bench", "profile", "all"])
    a, rest = ap.parse_known_args()
    stages = ["build", "quantize", "variants", "report", "bench", "profile"] if a.stage == "all" else [a.stage]
    for s in stages:
        globals()[s](*rest) if (rest and s == "bench") else globals()[s]()


if __name__ == "__main__":
    main()
