"""Required features: what a file needs its reader to implement beyond decoding weights.

Some models only compute what they were trained to compute when the runtime does something
more than load their weights: DoReFa models quantize activations at inference; FBS models
gate channels per image at run time. Running such a file without that step gives wrong answers
silently, so the file says so, and a reader that cannot comply refuses it:

* `Model.required_features` lists the features by name, and preamble flag bit 1
  (`FLAG_REQUIRED_FEATURES`) is set whenever that list is non-empty. Format 1.0 readers do
  not know the bit and refuse the file with UnsupportedVersion before reading the index.
* A reader of format 1.1 or newer refuses a file naming a feature it does not know
  (UnsupportedVersion: "needs a weightpack that reads format 1.N ...").
* The writer stamps the lowest format minor that knows every feature the file uses, so a
  file without features stays a format 1.0 file that every reader opens.

Adding a feature: give its name and the format minor that introduces it in `FEATURES`,
append its data to the schema, check that data against the declaration in
`check_features`, apply it in the runtime (and refuse, by name, any runtime path that
cannot apply it), and document it in docs/FORMAT.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from runtime.errors import FormatError, UnsupportedVersion
from runtime.format.preamble import FLAG_REQUIRED_FEATURES, FORMAT_MAJOR, FORMAT_MINOR, Preamble
from runtime.format.records import ModelRecord, TensorRecord

ACTIVATION_QUANT = "activation_quant"
CHANNEL_GATING = "channel_gating"
HALF_SCALES = "half_scales"

FEATURES: dict[str, int] = {
    ACTIVATION_QUANT: 1,  # Model.activation_quant: quantize layer inputs (DoReFa bits_a)
    CHANNEL_GATING: 2,  # Model.channel_gates: FBS gates conv output channels per image
    HALF_SCALES: 3,  # Uniform tensors' scales stored as Float16 arrays (BWN-F with fp16=true)
}
"""Every feature this reader implements -> the format minor that introduced it."""


def format_minor(features: Iterable[str]) -> int:
    """The format minor a writer stamps on a file that requires `features` (0: none)."""
    return max((FEATURES[f] for f in features), default=0)


def check_features(model: ModelRecord, preamble: Preamble) -> None:
    """Refuse a file whose required features this reader lacks, or whose declaration
    disagrees with the preamble flag or with the data the index holds."""
    features = model.required_features
    flagged = bool(preamble.flags & FLAG_REQUIRED_FEATURES)
    if flagged != bool(features):
        raise FormatError("the preamble's required-features flag and the index's "
                          "required_features list disagree")
    if len(set(features)) != len(features):
        raise FormatError("required_features names a feature twice")
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise UnsupportedVersion(
            f"needs a weightpack that reads format {preamble.major}.{preamble.minor} or newer: "
            f"feature {unknown[0]!r} is unknown to this one (it reads format "
            f"{FORMAT_MAJOR}.{FORMAT_MINOR})")
    if preamble.minor < format_minor(features):
        raise FormatError(f"file declares format {preamble.major}.{preamble.minor}, but "
                          f"feature(s) {', '.join(features)} need format "
                          f"{preamble.major}.{format_minor(features)}")
    held = features_held(model.tensors, model.activation_quant, model.channel_gates)
    for feature, what in HELD_AS.items():
        if (feature in held) != (feature in features):
            raise FormatError(f"{what} and the {feature!r} feature must come together")


HELD_AS: dict[str, str] = {
    ACTIVATION_QUANT: "activation quantization records",
    HALF_SCALES: "Float16 uniform scales",
    CHANNEL_GATING: "channel gate records",
}
"""What in a file's index makes it need each feature (in the order the reader checks them)."""


def features_held(tensors: Iterable[TensorRecord], activation_quant: Sequence[object],
                  channel_gates: Sequence[object]) -> set[str]:
    """The features a file's data needs: the one rule, for the writer declaring them and the
    reader checking the declaration."""
    half_scales = any(t.scheme == "uniform" and t.scales is not None
                      and t.scales.dtype == "float16" for t in tensors)
    return ({ACTIVATION_QUANT} if activation_quant else set()) | (
        {HALF_SCALES} if half_scales else set()) | (
        {CHANNEL_GATING} if channel_gates else set())
