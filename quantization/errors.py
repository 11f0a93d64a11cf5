"""Errors a user of the quantization flow can hit. Each says what was wrong and what is accepted."""

from __future__ import annotations

from engine.errors import EngineError


class QuantizationError(EngineError, ValueError):
    """Bad input to the quantization flow: precision, output folder, prompt file, policy, checkpoint."""


class ModelOptUnavailable(QuantizationError):
    """NVIDIA ModelOpt (``nvidia-modelopt``, the ``quant`` extra) is not installed."""


def require_modelopt():
    """Import ModelOpt's quantization API, or raise ModelOptUnavailable with the install command."""
    try:
        import modelopt.torch.opt as mto
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise ModelOptUnavailable(
            f"NVIDIA ModelOpt is not installed ({exc}); install the quant extra: pip install 'sana-video-server[quant]'"
        ) from exc
    return mtq, mto
