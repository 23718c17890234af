"""The local models' error hierarchy (mapped to HTTP by the proxy, or turned into an escalation)."""

from __future__ import annotations


class LocalModelError(Exception):
    """Base of every local-model error."""

    reason = "error"  # short word shown in x-escalated


class Unsupported(LocalModelError):
    """The request asks for something a local model does not do (tools, images, ...): go to the next tier."""

    reason = "unsupported"


class Saturated(LocalModelError):
    """The model's queue is full: skip it rather than queue without limit."""

    reason = "saturated"


class PromptTooLong(LocalModelError):
    """The prompt leaves no room to answer in the model's context."""

    reason = "too-long"


class Cancelled(LocalModelError):
    """The caller went away; generation stopped early."""

    reason = "cancelled"


class Crashed(LocalModelError):
    """llama.cpp died (or hung) in the model's child process while answering: the request escalates and the next
    one gets a new child (local_models.isolation)."""

    reason = "crashed"


class TierOff(LocalModelError):
    """The model did not pass its start-up self-check (local_models.selfcheck), or crashed too often: it is not
    run until the proxy restarts."""

    reason = "off"


class LoadFailed(LocalModelError):
    """A configured model could not be loaded (bad path, not a GGUF, ...)."""
