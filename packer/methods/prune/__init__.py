"""`prune`: magnitude, SNIP and ECS pruning with a mask held through fine-tuning."""

from packer.methods.prune.method import PruneMethod

__all__ = ["PruneMethod"]
