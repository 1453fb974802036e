"""Dynamic expert pruning: ODP (ratio rule + token protection, MC-MoE) and OTP (learned top-any masks, MC#)."""
