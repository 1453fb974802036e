"""Dynamic expert pruning: ODP (ratio rule + token protection, MC-MoE) and OTP (learned top-any masks, MC#).

What the other stages call::

    from mcmoe_vl.pruning import (ODPConfig, OTPConfig, PruningMethod, fit_pruning, save_pruning, load_pruning,
                                  apply_pruning, ActivationMeter)
    from model_adapters import expert_interface

    art = fit_pruning(model, calib_batches, PruningMethod.ODP, odp=ODPConfig(prune_rate=0.15))   # or OTP
    save_pruning(art, "ckpt/pruning.json")
    with expert_interface(model) as iface, apply_pruning(iface, load_pruning("ckpt/pruning.json")), \\
            ActivationMeter(iface) as meter:
        ...                                   # evaluate
    meter.report()                            # active experts, reduction, activated parameters per token

See docs/pruning.md.
"""

from .accounting import ActivationMeter, ActivationReport, LayerActivation
from .artifact import (
    PruningArtifact,
    apply_pruning,
    check_compatible,
    load_pruning,
    odp_artifact,
    otp_artifact,
    save_pruning,
)
from .importance import AttentionColumnCapture, ColumnStats, ProtectScope, protection_mask, token_importance
from .method import PruningMethod
from .odp import ODPConfig, ODPRule, ODPThresholds, fit_odp, ratio_keep, thresholds_from_calibration_stats
from .otp import MaskPredictor, OTPConfig, OTPRule, train_otp
from .workflow import PruneRun, fit_pruning, prune_files

__all__ = [
    "ActivationMeter",
    "ActivationReport",
    "AttentionColumnCapture",
    "ColumnStats",
    "LayerActivation",
    "MaskPredictor",
    "ODPConfig",
    "ODPRule",
    "ODPThresholds",
    "OTPConfig",
    "OTPRule",
    "ProtectScope",
    "PruneRun",
    "PruningArtifact",
    "PruningMethod",
    "apply_pruning",
    "check_compatible",
    "fit_odp",
    "fit_pruning",
    "load_pruning",
    "odp_artifact",
    "otp_artifact",
    "protection_mask",
    "prune_files",
    "ratio_keep",
    "save_pruning",
    "thresholds_from_calibration_stats",
    "token_importance",
    "train_otp",
]
