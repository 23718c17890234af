"""The verifier's network: a cross-encoder made of the packaged embedder's first layers, read from the package, with
its top layers and a scoring head trained for paraphrase pairs, read from a small artifact.

The artifact (a folder: `weights.safetensors`, fp16, and `verifier.json`) holds only what differs from the
packaged all-MiniLM-L6-v2: the trained layers and the head, about 7 MB for two layers. Torch is needed to build
the network (training, and the one-time ONNX export at run time); serving runs the export on ONNX Runtime.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cache.embedder import DEFAULT_EMBEDDER, resolve_embedder_path

ARTIFACT = Path(__file__).resolve().parent / "verifier_model"  # the shipped default
WEIGHTS, META = "weights.safetensors", "verifier.json"


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

    @classmethod
    def read(cls, folder: Path) -> VerifierMeta:
        data = json.loads((folder / META).read_text())
        data["platt"] = tuple(data["platt"])
        return cls(**data)

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
        from safetensors.torch import load_file

        trained = {k: v.float() for k, v in load_file(str(artifact / WEIGHTS)).items()}
        missing = set(network.trained_state()) - set(trained)
        if missing:
            raise ValueError(f"{artifact / WEIGHTS} lacks {sorted(missing)[:3]}")
        network.load_state_dict(trained, strict=False)
    return network.eval()
