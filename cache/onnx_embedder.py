"""The same sentence-transformers weights run on ONNX Runtime: about 4 ms a query on 2 cores versus 25 ms
through torch (bench/embedder.py), with vectors equal to the torch ones to 1e-6.

The ONNX graph is exported from the packaged torch weights on first use and kept on disk; the export checks
its output against torch before the file is kept. BERT-style encoders are exported with eager attention and
fused by ONNX Runtime's transformer optimizer (one Attention, SkipLayerNormalization and BiasGelu node per
layer instead of dozens of small ones): 1.2x faster in fp32, and the fused Attention quantises as a whole.
The `onnx-int8` backend quantises that file's weights to int8, also once (kept beside it, checked against
fp32): a quarter of the size and about 1.5x faster per query than the fused fp32 file, with vectors at cosine
~0.994 to fp32's (docs/compression.md).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cache.embedder import TorchEmbedder, embedder_id, resolve_embedder_path
from cache.errors import EmbedderError

log = logging.getLogger("cachecade.embedder")
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_FUSABLE = ("bert",)  # model_type values the optimizer's "bert" fusions fit (MiniLM and other BERT encoders)
_CHECK_TEXTS = ["How do I learn Python quickly?", "Why is the sky blue?", "cachecade"]
# int8 vectors are close to fp32's but not equal, so they get their own index; the quantised graph changed when
# it became the fused one (vectors at cosine ~0.994 to the unfused int8 file's), hence "-fused".
INT8_SUFFIX = "+int8-fused"
GRAPH_VERSION = "fused"  # in the file name, so an unfused export kept by an older version is not reused
# Threads for one embedding when the setting leaves it open, measured one query at a time on 2 cores (docs/
# compression.md): fp32 gains from a second thread (4.3 against 5.5 ms), int8 does not (2.6 against 2.7 ms) and
# leaves the other core to the event loop.
DEFAULT_THREADS = {"fp32": 2, "int8": 1}
# Mean cosine to the fp32 vectors below which a quantised file is refused: a good one scores about 0.99.
INT8_MIN_AGREEMENT = 0.95
_INT8_CHECK_TEXTS = [
    *_CHECK_TEXTS, "What is the best way to lose weight fast?", "How does a vaccine work?",
    "Can you recommend a good science fiction novel?", "Is it safe to eat raw cookie dough?",
]  # fmt: skip


def _fingerprint(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "modules.json"):
        if (model_dir / name).exists():
            digest.update((model_dir / name).read_bytes())
    for name, size in sorted(_weights(model_dir).items()):
        digest.update(f"{name}:{size}".encode())
    return digest.hexdigest()[:16]


def _weights(model_dir: Path) -> dict[str, int]:
    """The weight files' names and sizes: those on disk, and those its package installed (from the package's
    RECORD), so that the sidecar image, which keeps only the ONNX export and drops the weights, finds the same
    export by the same fingerprint."""
    sizes = {p.name: p.stat().st_size for p in model_dir.glob("*.safetensors")}
    package = model_dir.parent.name
    try:
        files = importlib.metadata.distribution(package.replace("_", "-")).files or []
    except importlib.metadata.PackageNotFoundError:
        return sizes
    for file in files:
        if (
            file.name.endswith(".safetensors")
            and file.size
            and Path(file.locate()).parent.resolve() == model_dir.resolve()
        ):
            sizes.setdefault(file.name, file.size)
    return sizes


def _check_pipeline(model_dir: Path) -> int:
    """The max sequence length; refuse models whose pooling we do not reproduce (mean + normalise)."""
    modules = json.loads((model_dir / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    if kinds != ["Transformer", "Pooling", "Normalize"] or not pooling.get("pooling_mode_mean_tokens"):
        raise EmbedderError(f"{model_dir}: the onnx backend supports mean pooling + normalise; use backend torch")
    config = model_dir / "sentence_bert_config.json"
    return int(json.loads(config.read_text()).get("max_seq_length", 256)) if config.exists() else 256


@contextmanager
def _atomic_file(target: Path) -> Iterator[Path]:
    """A temporary path beside `target`, moved onto it only when the block succeeds: a crash or a failed check
    never leaves a half-written or unverified model where the next start would load it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file owner-only; a model file is for every user (a container builds it as root and
        # serves it as another user).
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export_onnx(model_dir: Path, target: Path) -> None:
    """Export the transformer to ONNX (atomic write), verified against torch."""
    import torch

    reference = TorchEmbedder.load(str(model_dir))
    transformer = reference.model[0].auto_model.eval()
    if _bert_shape(model_dir) is not None:
        # The optimizer recognises attention in the eager graph; SDPA's export hides it behind other ops.
        transformer.set_attn_implementation("eager")

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = transformer

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
                    ) -> torch.Tensor:  # fmt: skip
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    sample = reference.model.tokenizer(_CHECK_TEXTS[:1], return_tensors="pt")
    axes = {name: {0: "batch", 1: "sequence"} for name in (*_INPUTS, "last_hidden_state")}
    with _atomic_file(target) as tmp, tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        raw = Path(scratch) / "export.onnx"  # the graph before fusion, never kept
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about constant shapes; the export is verified below
            torch.onnx.export(Hidden(), tuple(sample[n] for n in _INPUTS), str(raw), input_names=list(_INPUTS),
                              output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17,
                              dynamo=False)  # fmt: skip
        _fuse(raw, tmp, model_dir)
        candidate = OnnxEmbedder(tmp, model_dir, reference.model_id)
        agreement = float((candidate.encode(_CHECK_TEXTS) * reference.encode(_CHECK_TEXTS)).sum(axis=1).min())
        if agreement < 0.999:
            raise EmbedderError(f"ONNX export of {model_dir} disagrees with torch (cosine {agreement:.4f})")


def _bert_shape(model_dir: Path) -> tuple[int, int] | None:
    """(attention heads, hidden size) of a BERT-style encoder, which the optimizer fuses; None for others."""
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") not in _FUSABLE:
        return None
    return int(config["num_attention_heads"]), int(config["hidden_size"])


def _fuse(source: Path, target: Path, model_dir: Path) -> None:
    """Write `source` to `target` with ONNX Runtime's transformer fusions (BERT-style encoders), or unchanged."""
    shape = _bert_shape(model_dir)
    if shape is None:
        shutil.copyfile(source, target)
        return
    from onnxruntime.transformers import optimizer

    heads, hidden = shape
    fused = optimizer.optimize_model(str(source), model_type="bert", num_heads=heads, hidden_size=hidden)
    counts = fused.get_fused_operator_statistics()
    log.info("fused %s: %s", model_dir.name, {op: n for op, n in counts.items() if n})
    fused.save_model_to_file(str(target))


def quantize_fused(fp32_path: Path, out: Path, reduce_range: bool = False) -> None:
    """Dynamic int8 quantisation of a fused export: signed per-channel weights, activations quantised per call.
    reduce_range (7-bit weights) avoids the saturation of AVX2's u8*s8 multiply-add on CPUs without VNNI."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Shape inference cannot type the outputs of the fused (com.microsoft) nodes; they are all float.
    quantize_dynamic(fp32_path, out, per_channel=True, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # fmt: skip


def quantize_int8(fp32_path: Path, model_dir: Path, target: Path) -> None:
    """Quantise the fp32 export's weights to int8 (atomic write), refused unless its vectors stay close to fp32's.

    Dynamic quantisation: weights are stored as int8, activations are quantised per call, so no calibration
    data is needed. Signed per-channel weights kept the most quality (per-tensor scales: mean cosine 0.97, worst
    0.85, against 0.994 and 0.98) and unsigned weights ran a third slower on this CPU (AVX-512 VNNI).
    """
    with _atomic_file(target) as tmp:
        quantize_fused(fp32_path, tmp)
        reference = OnnxEmbedder(fp32_path, model_dir, "fp32").encode(_INT8_CHECK_TEXTS)
        candidate = OnnxEmbedder(tmp, model_dir, "int8").encode(_INT8_CHECK_TEXTS)
        agreement = float((candidate * reference).sum(axis=1).mean())
        if agreement < INT8_MIN_AGREEMENT:
            raise EmbedderError(f"int8 quantisation of {model_dir} strays from fp32 (mean cosine {agreement:.4f} < "
                                f"{INT8_MIN_AGREEMENT}); use backend onnx")  # fmt: skip


class OnnxEmbedder:
    """Tokenizer (HF tokenizers) + ONNX Runtime + mean pooling + L2 normalisation."""

    def __init__(self, onnx_path: Path, model_dir: Path, model_id: str, threads: int | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        max_length = _check_pipeline(model_dir)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()  # padding per batch in _run, to the batch's longest text
        self.tokenizer.enable_truncation(max_length)
        self.batch_size = 32
        self.max_tokens = max_length
        options = ort.SessionOptions()
        self.threads = threads or min(DEFAULT_THREADS["fp32"], os.cpu_count() or 1)
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # Idle threads sleep instead of spinning: spinning saved 2 ms per embedding in isolation but stole the
        # cores from the event loop and from a co-located upstream (a miss got 40 ms slower; bench/latency.py).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.onnx_path = onnx_path
        self.model_id = model_id
        self.dim = int(self.session.get_outputs()[0].shape[-1])

    @classmethod
    def load(cls, name: str, cache_dir: Path, threads: int | None = None, int8: bool = False) -> OnnxEmbedder:
        """Load the ONNX graph for a packaged name or model directory, exporting it on first use; with `int8`,
        its int8 quantisation (made from the fp32 file on first use, kept beside it). `threads` None: the
        measured best for the precision (DEFAULT_THREADS)."""
        model_dir = resolve_embedder_path(name)
        fp32_path = cache_dir / "onnx" / f"{model_dir.parent.name}-{_fingerprint(model_dir)}.{GRAPH_VERSION}.onnx"
        path, model_id = (fp32_path, embedder_id(name))
        if int8:
            path, model_id = (fp32_path.with_suffix(".int8.onnx"), model_id + INT8_SUFFIX)
        threads = threads or min(DEFAULT_THREADS["int8" if int8 else "fp32"], os.cpu_count() or 1)
        try:
            if not fp32_path.exists() and not path.exists():
                log.info("exporting %s to ONNX at %s (once)", name, fp32_path)
                export_onnx(model_dir, fp32_path)
            if not path.exists():
                log.info("quantising %s to int8 at %s (once)", name, path)
                quantize_int8(fp32_path, model_dir, path)
            return cls(path, model_dir, model_id, threads)
        except EmbedderError:
            raise
        except Exception as exc:
            raise EmbedderError(f"could not load the ONNX embedder for {name}: {exc}") from exc

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(self.tokenizer.encode_batch(list(texts)))

    def encode_fitting(self, texts: Sequence[str]) -> list[np.ndarray | None]:
        encodings = self.tokenizer.encode_batch(list(texts))  # one tokenization serves the check and the model
        fits = [not e.overflowing for e in encodings]
        vectors = iter(self._encode([e for e, ok in zip(encodings, fits, strict=True) if ok]))
        return [next(vectors) if ok else None for ok in fits]

    def _encode(self, encodings: list[Any]) -> np.ndarray:
        out = np.zeros((len(encodings), self.dim), dtype=np.float32)
        if not encodings:
            return out
        # Batches of similar length waste little on padding; the order is restored on the way out.
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            out[rows] = self._run([encodings[i] for i in rows])
        return out

    def _run(self, encodings: list[Any]) -> np.ndarray:
        width = max(len(e.ids) for e in encodings)

        def column(name: str) -> np.ndarray:
            return np.array([getattr(e, name)[:width] + [0] * (width - len(e.ids)) for e in encodings], dtype=np.int64)

        feed = {"input_ids": column("ids"), "attention_mask": column("attention_mask"),
                "token_type_ids": column("type_ids")}  # fmt: skip
        hidden = self.session.run(None, feed)[0]
        mask = feed["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return np.asarray(pooled / norms, dtype=np.float32)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        # Truncation is on, so the tokens cut off are in `overflowing` (stride 0: no overlap).
        encodings = self.tokenizer.encode_batch(list(texts))
        return [len(e.ids) + sum(len(o.ids) for o in e.overflowing) for e in encodings]
