"""`fbs`: Feature Boosting and Suppression, dynamic channel gating (docs/FBS.md)."""

from packer.methods.fbs.method import FBSMethod, select_gates, stage_ratios

__all__ = ["FBSMethod", "select_gates", "stage_ratios"]
