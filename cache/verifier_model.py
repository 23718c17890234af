"""The verifier's network: a cross-encoder made of the packaged embedder's first layers, read from the package, with
its top layers and a scoring head trained for paraphrase pairs, read from a small artifact.

The artifact (a folder: `weights.npz` and `verifier.json`) holds only what differs from the packaged
all-MiniLM-L6-v2: for each trained matrix its difference from the package's, in int8 with a scale per row
(the difference is small, so this keeps the logits to about 1e-3), compressed; vectors (biases, norms) and the
head as they are, in fp16. About 4 MB for three layers, against 10.6 MB in fp16. Torch is needed to build
the network (training, and the one-time ONNX export at run time); serving runs the export on ONNX Runtime.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cache.embedder import DEFAULT_EMBEDDER, resolve_embedder_path

ARTIFACT = Path(__file__).resolve().parent / "verifier_model"  # the shipped default
WEIGHTS, META = "weights.npz", "verifier.json"


@dataclass
class VerifierMeta:
    """What the artifact is and how to read its scores."""

    base: str = DEFAULT_EMBEDDER  # the packaged embedder whose first layers it reuses
    layers: int = 4  # transformer layers kept from the base
    trained_from: int = 2  # layers below this are the base's, untouched; the rest are in the artifact
    max_length: int = 96  # tokens of the pair, [CLS] a [SEP] b [SEP]
    pooling: str = "cls"  # what the head reads: the [CLS] token ("cls") or the mean over the pair's tokens ("mean")
    platt: tuple[float, float] = (1.0, 0.0)  # probability = sigmoid(a * logit + b), fitted on validation pairs
    threshold: float = 0.5  # the default: a calibrated probability, chosen on validation pairs
    band_low: float = 0.8  # cosine below which candidates are never verified (they are misses)
    training: dict[str, Any] = field(default_factory=dict)  # data, seed, steps, validation figures
    # The int8 export's own calibration ({"platt": [a, b], "threshold": t, "validation": ...}): quantisation moves
    # the logits a little, so its probabilities are fitted on its own scores. Empty: the artifact has none, and
    # it serves in fp32.
    int8: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path) -> VerifierMeta:
        data = json.loads((folder / META).read_text())
        data["platt"] = tuple(data["platt"])
        return cls(**data)

    def as_int8(self) -> VerifierMeta:
        """This meta with the int8 export's calibration in force (platt, threshold)."""
        return replace(self, platt=tuple(self.int8["platt"]), threshold=float(self.int8["threshold"]))

    def write(self, folder: Path) -> None:
        (folder / META).write_text(json.dumps(asdict(self), indent=2) + "\n")


def build_network(meta: VerifierMeta, artifact: Path | None) -> Any:
    """The torch cross-encoder: the base's first `meta.layers` layers, the artifact's trained layers and head
    loaded over them when `artifact` is given (else the base's layers and a fresh head, to train)."""
    import torch
    from transformers import AutoModel

    class CrossEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = AutoModel.from_pretrained(resolve_embedder_path(meta.base), attn_implementation="eager")
            self.encoder.encoder.layer = self.encoder.encoder.layer[: meta.layers]
            self.encoder.config.num_hidden_layers = meta.layers
            self.head = torch.nn.Linear(self.encoder.config.hidden_size, 1)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
                    ) -> torch.Tensor:  # fmt: skip
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state  # fmt: skip
            if meta.pooling == "mean":
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            else:
                pooled = hidden[:, 0]
            return self.head(pooled).squeeze(-1)  # one logit per pair

        def trained_state(self) -> dict[str, torch.Tensor]:
            """The parameters the artifact holds: trained layers and the head."""
            keep = [f"encoder.encoder.layer.{i}." for i in range(meta.trained_from, meta.layers)] + ["head."]
            return {k: v for k, v in self.state_dict().items() if k.startswith(tuple(keep))}

    network = CrossEncoder()
    if artifact is not None:
        base = network.trained_state()
        with np.load(artifact / WEIGHTS) as stored:
            missing = set(base) - {k.split("|")[0] for k in stored.files}
            if missing:
                raise ValueError(f"{artifact / WEIGHTS} lacks {sorted(missing)[:3]}")
            network.load_state_dict({k: torch.from_numpy(_restore(k, v, stored)) for k, v in base.items()},
                                    strict=False)  # fmt: skip
    return network.eval()


def save_trained(network: Any, base: Mapping[str, Any], path: Path) -> None:
    """Write the network's trained tensors: matrices as an int8 difference from `base` (the package's) with a
    float32 scale per row, the rest in fp16 (see the module docstring)."""
    arrays: dict[str, np.ndarray] = {}
    for name, tensor in network.trained_state().items():
        value = tensor.detach().float().numpy()
        if value.ndim == 2 and name.startswith("encoder.") and name in base:  # the head is new: kept whole
            delta = value - base[name].detach().float().numpy()
            scale = np.abs(delta).max(axis=1, keepdims=True) / 127.0 + 1e-12
            arrays[f"{name}|q"] = np.round(delta / scale).astype(np.int8)
            arrays[f"{name}|scale"] = scale.astype(np.float32)
        else:
            arrays[f"{name}|fp16"] = value.astype(np.float16)
    with path.open("wb") as out:
        np.savez_compressed(out, **arrays)  # type: ignore[arg-type]  # numpy types the name kwargs as its options
    path.chmod(0o644)  # an artifact is for every user (a container serves it as another one)


def _restore(name: str, base: Any, stored: Any) -> np.ndarray:
    if f"{name}|q" in stored.files:
        delta = stored[f"{name}|q"].astype(np.float32) * stored[f"{name}|scale"]
        return np.asarray(base.detach().float().numpy() + delta, dtype=np.float32)
    return np.asarray(stored[f"{name}|fp16"], dtype=np.float32)
