"""The pruning methods: the tag of a pruning config (:class:`~mcmoe_vl.pruning.odp.ODPConfig`,
:class:`~mcmoe_vl.pruning.otp.OTPConfig`) and of a pruning artifact."""

from __future__ import annotations

import enum


class PruningMethod(str, enum.Enum):
    ODP = "odp"  # ratio rule (+ token protection when protect_ratio > 0)
    OTP = "otp"  # learned top-any masks
