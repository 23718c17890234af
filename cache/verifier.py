"""The verifier: a pair model that reads a query and a cached question together and says how likely they ask the
same thing. A semantic candidate is served only when the verifier accepts it (ResponseCache), so questions that
reuse the same words in another order, or change a number, are misses even at a high cosine.

The network (verifier_model) is exported to ONNX once, from the packaged embedder's layers and the artifact's
trained ones, into the model cache (checked against torch before it is kept), and runs on ONNX Runtime. Scores
are calibrated probabilities (Platt scaling fitted on held-out pairs: verifier_training).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cache.embedder import resolve_embedder_path
from cache.errors import EmbedderError
from cache.onnx_embedder import _atomic_file, _fuse, quantize_fused
from cache.verifier_model import ARTIFACT, WEIGHTS, VerifierMeta, build_network

log = logging.getLogger("cachecade.verifier")
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
INT8_MAX_DRIFT = 1.0  # logits; on 1,000 QQP pairs int8 moved them by 0.2 on average, 1.3 at most
_CHECK = [("How do I learn Python quickly?", "What is the fastest way to learn Python?"),
          ("Flights from Paris to Rome", "Flights from Rome to Paris")]  # fmt: skip


_POLITE = re.compile(r"^(?:please tell me|can you tell me|could you tell me|tell me|i'd like to know|i would like "
                     r"to know|quick question|hey|hi|please)\b[\s,:]*")  # fmt: skip
_CONTRACTED = {"what's": "what is", "who's": "who is", "where's": "where is", "how's": "how is", "it's": "it is",
               "there's": "there is", "that's": "that is", "don't": "do not", "doesn't": "does not",
               "didn't": "did not", "isn't": "is not", "aren't": "are not", "can't": "cannot", "i'm": "i am",
               "won't": "will not", "i've": "i have", "you're": "you are", "we're": "we are"}  # fmt: skip
_WORD = re.compile(r"[a-z']+")


def canonical(text: str) -> str:
    """A question's form stripped of what never changes its meaning: case, spacing, punctuation at its ends,
    contractions and a polite wrapper ("please tell me ...", "... please"). Two texts with the same canonical
    form ask the same thing, and are served without asking the model."""
    out = " ".join(text.lower().replace("\u2019", "'").split()).strip(" ?.!,;:")
    for _ in range(2):
        out = _POLITE.sub("", out).strip(" ?.!,;:")
    out = re.sub(r"[\s,]+please$", "", out).strip(" ?.!,;:")
    return _WORD.sub(lambda m: _CONTRACTED.get(m[0], m[0]), out)


class PairVerifier:
    """Scores (query, cached question) pairs: calibrated probabilities that they ask the same thing. Blocking:
    AsyncVerifier calls it off the event loop."""

    def __init__(self, onnx_path: Path, meta: VerifierMeta, model_id: str, threads: int = 2) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(resolve_embedder_path(meta.base) / "tokenizer.json"))
        self.tokenizer.enable_truncation(meta.max_length)
        self.tokenizer.no_padding()
        self.meta = meta
        self.model_id = model_id

    @classmethod
    def load(cls, artifact: Path | None, cache_dir: Path, threads: int = 2, backend: str = "onnx-int8"
             ) -> PairVerifier:  # fmt: skip
        """The verifier of an artifact folder (None: the shipped one), exported to ONNX on first use, and
        quantised to int8 for backend "onnx-int8" when the artifact carries an int8 calibration (else fp32, with
        a warning). Two threads by default. One pair on the 2-core AVX2 machine: 2.1 ms in int8, 4.5 ms in fp32
        (bench/verifier.py)."""
        folder = artifact or ARTIFACT
        if not (folder / WEIGHTS).is_file():
            raise EmbedderError(f"{folder} holds no verifier ({WEIGHTS}); train one with `cachecade train-verifier`")
        meta = VerifierMeta.read(folder)
        digest = hashlib.sha256((folder / WEIGHTS).read_bytes() + repr(meta.layers).encode()).hexdigest()[:16]
        target = cache_dir / f"verifier-{digest}.onnx"
        quantized = cache_dir / f"verifier-{digest}-int8.onnx"
        int8 = backend == "onnx-int8" and meta.int8
        if not target.exists() and not (int8 and quantized.exists()):  # (an image may ship the int8 file alone)
            log.info("exporting the verifier %s to %s (once)", folder, target)
            export(folder, meta, target)
        if backend == "onnx-int8":
            if int8:
                if not quantized.exists():
                    quantize(target, meta, quantized)
                return cls(quantized, meta.as_int8(), f"verifier-{digest}-int8", threads)
            log.warning("the verifier %s has no int8 calibration (train it again, or `cachecade train-verifier "
                        "--recalibrate`); serving it in fp32", folder)  # fmt: skip
        return cls(target, meta, f"verifier-{digest}", threads)

    def logits(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """The network's raw scores, one per pair (padded into one batch)."""
        encodings = self.tokenizer.encode_batch(list(pairs))
        width = max(len(e.ids) for e in encodings)

        def column(name: str) -> np.ndarray:
            out = np.zeros((len(encodings), width), dtype=np.int64)
            for row, e in enumerate(encodings):
                values = {"input_ids": e.ids, "attention_mask": e.attention_mask, "token_type_ids": e.type_ids}[name]
                out[row, : len(values)] = values
            return out

        return np.asarray(self.session.run(["logit"], {name: column(name) for name in _INPUTS})[0], dtype=np.float64)

    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """Calibrated probabilities that each pair asks the same thing."""
        if not pairs:
            return np.zeros(0)
        a, b = self.meta.platt
        return np.asarray(1 / (1 + np.exp(-(a * self.logits(pairs) + b))))


def export(folder: Path, meta: VerifierMeta, target: Path) -> None:
    """Export the network to ONNX (fused like the embedder), kept only when it agrees with torch."""
    import tempfile

    import torch

    network = build_network(meta, folder)
    tokenizer_path = resolve_embedder_path(meta.base)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    sample = tokenizer([a for a, _ in _CHECK], [b for _, b in _CHECK], padding=True, return_tensors="pt")
    axes = {name: {0: "batch", 1: "sequence"} for name in _INPUTS} | {"logit": {0: "batch"}}
    with _atomic_file(target) as tmp, tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        raw = Path(scratch) / "export.onnx"
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(network, tuple(sample[n] for n in _INPUTS), str(raw), input_names=list(_INPUTS),
                              output_names=["logit"], dynamic_axes=axes, opset_version=17, dynamo=False)  # fmt: skip
            expected = network(**{n: sample[n] for n in _INPUTS}).numpy()
        _fuse(raw, tmp, tokenizer_path)
        got = PairVerifier(tmp, meta, "check").logits(_CHECK)
        if not np.allclose(got, expected, atol=1e-3):
            raise EmbedderError(f"ONNX export of the verifier disagrees with torch ({got} vs {expected})")


def quantize(fp32: Path, meta: VerifierMeta, target: Path) -> None:
    """The int8 form of an export (dynamic quantisation: int8 weights per channel, activations quantised per
    call), kept only when its logits stay near fp32's on the check pairs. reduce_range (7-bit weights) avoids the
    saturation of AVX2's u8*s8 multiply-add, which moved logits by up to 2 on machines without VNNI."""
    with _atomic_file(target) as tmp:
        quantize_fused(fp32, tmp, reduce_range=True)
        got, expected = PairVerifier(tmp, meta, "int8").logits(_CHECK), PairVerifier(fp32, meta, "fp32").logits(_CHECK)
        if np.abs(got - expected).max() > INT8_MAX_DRIFT:
            raise EmbedderError(f"int8 quantisation of the verifier strays from fp32 ({got} vs {expected}); serve it "
                                f"with CACHECADE_CACHE_VERIFIER_BACKEND=onnx")  # fmt: skip


class AsyncVerifier:
    """PairVerifier off the event loop, on one thread of its own: the candidates of one lookup are scored in one
    batch, and lookups that arrive while a batch runs are scored together in the next."""

    def __init__(self, verifier: PairVerifier, max_batch: int = 16) -> None:
        self.verifier = verifier
        self.max_batch = max_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verifier")
        self._queue: list[tuple[list[tuple[str, str]], asyncio.Future[np.ndarray]]] = []
        self._draining = False

    @property
    def meta(self) -> VerifierMeta:
        return self.verifier.meta

    async def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """Probabilities for these pairs."""
        if not pairs:
            return np.zeros(0)
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.append((list(pairs), future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                taken: list[tuple[list[tuple[str, str]], asyncio.Future[np.ndarray]]] = []
                size = 0
                while self._queue and (not taken or size + len(self._queue[0][0]) <= self.max_batch):
                    item = self._queue.pop(0)
                    taken.append(item)
                    size += len(item[0])
                flat = [pair for pairs, _ in taken for pair in pairs]
                try:
                    scores = await asyncio.get_running_loop().run_in_executor(self._executor, self.verifier.score,
                                                                              flat)  # fmt: skip
                except Exception as exc:  # every waiter of the batch gets the error, none hangs
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for pairs, future in taken:
                    if not future.done():
                        future.set_result(scores[start : start + len(pairs)])
                    start += len(pairs)
        finally:
            self._draining = False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
