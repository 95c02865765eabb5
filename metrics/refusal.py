"""The refusal keyword presets, as metrics see them. They live in `core.refusal`, below every
package, because data tools (`attacks.records`) classify refusals too; this module is the
metrics-facing name for them."""

from core.refusal import REFUSAL_PRESETS, VLGUARD_PHRASES, is_refusal, refusal_presets

__all__ = ["REFUSAL_PRESETS", "VLGUARD_PHRASES", "is_refusal", "refusal_presets"]
