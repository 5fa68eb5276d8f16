"""Transfer learning from files: encoder weights a user brings, in the layouts the field ships them in.

Nothing is downloaded. An encoder state dict is read from a local file (safetensors, or a torch file loaded
with ``weights_only=True``, which refuses pickles that carry code) in any of these layouts, recognised by
its keys: smp's own encoder (``model.encoder.state_dict()``), a whole smp model or geoseg checkpoint
(``encoder.`` prefix), a torchvision or timm classifier (``fc.``/``head.``/``classifier.`` dropped), a
timm model for a ``tu-`` encoder (``model.`` prefix), and any of them wrapped by a training framework
(``state_dict``/``model`` entries, ``module.`` prefixes). The first convolution is adapted to the band
count as smp does for ``in_channels != 3``: one band gets the sum of the RGB filters; n bands get filter
``k mod 3`` for band k (band 1 the first filter, R in torchvision's and timm's weights), scaled by 3/n.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoseg.errors import CheckpointError

if TYPE_CHECKING:
    import torch

#: Classifier heads of ImageNet models (torchvision fc, timm head/classifier/fc_norm): not part of an encoder.
HEAD_PREFIXES = ("fc.", "head.", "classifier.", "fc_norm.", "head_drop.", "last_linear.")
#: Wrappers training frameworks put around a state dict.
_WRAPPERS = ("state_dict", "model", "model_state_dict", "encoder")


@dataclass(frozen=True)
class EncoderLoad:
    """What :func:`load_encoder_weights` did: the layout it recognised and the tensors it used or adapted."""

    path: Path
    layout: str
    loaded: int
    adapted: tuple[str, ...]
    """Tensors whose input channels were adapted to the band count (the first convolution)."""
    dropped: tuple[str, ...]
    """Classifier-head tensors of the file that an encoder has no place for."""

    def describe(self) -> dict[str, Any]:
        """The record kept in the checkpoint's provenance."""
        from geoseg._io import file_digest

        return {"path": str(self.path), "sha256": file_digest(self.path), "layout": self.layout,
                "tensors": self.loaded, "adapted": list(self.adapted), "dropped": len(self.dropped)}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or torch file (never unpickling code), unwrapped from framework containers."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: encoder weights not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a state dict that loads without running code ({first[:200]})") from None
    for _ in range(3):  # {"state_dict": {...}}, {"model": {...}}, nested at most a few levels
        if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), dict)), None)
            if inner is None:
                break
            state = inner
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (expected an encoder state dict)")
    return tensors


def _candidates(keys: list[str]) -> list[tuple[str, str, str]]:
    """(layout name, prefix to strip, prefix to add) for the layouts a file might be in."""
    out = [("smp encoder", "", ""), ("smp model or geoseg checkpoint", "encoder.", ""),
           ("timm model for a tu- encoder", "", "model."), ("smp tu- encoder in a model", "encoder.", "")]
    if any(k.startswith("module.") for k in keys):  # DataParallel / DistributedDataParallel
        out += [(f"{name} (module. prefix)", "module." + strip, add) for name, strip, add in out]
    return out


def _rename(state: dict[str, torch.Tensor], strip: str, add: str) -> dict[str, torch.Tensor]:
    return {add + k[len(strip):]: v for k, v in state.items() if k.startswith(strip)}


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A convolution weight for ``in_channels`` from one for 3 (smp's ``patch_first_conv`` rule)."""
    import torch

    if in_channels == 1:
        return weight.sum(1, keepdim=True)
    index = torch.arange(in_channels) % weight.shape[1]
    return weight[:, index] * (weight.shape[1] / in_channels)


def load_encoder_weights(model: torch.nn.Module, path: str | Path) -> EncoderLoad:
    """Load the encoder weights in ``path`` into ``model.encoder``; a mismatch is a one-line error.

    The error names the layout the file looked like and its first missing and unexpected keys.
    """
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        raise CheckpointError(f"model.encoder_weights: {type(model).__name__} has no encoder to load weights into")
    path = Path(path)
    source = read_state_dict(path)
    target = encoder.state_dict()
    best: tuple[int, str, dict[str, torch.Tensor]] | None = None
    for layout, strip, add in _candidates(list(source)):
        renamed = _rename(source, strip, add)
        hits = sum(k in target for k in renamed)
        if best is None or hits > best[0]:
            best = (hits, layout, renamed)
    assert best is not None
    _, layout, renamed = best
    dropped = tuple(k for k in renamed if k not in target and k.removeprefix("model.").startswith(HEAD_PREFIXES))
    missing = [k for k in target if k not in renamed]
    unexpected = [k for k in renamed if k not in target and k not in dropped]
    # Only the network's first convolution sees the bands; another shape elsewhere is another network.
    first_conv = next((k for k, v in target.items() if v.ndim == 4), None)
    adapted: list[str] = []
    wrong_shape: list[str] = []
    state: dict[str, torch.Tensor] = {}
    for key, want in target.items():
        if key not in renamed:
            continue
        have = renamed[key]
        if key == first_conv and have.shape != want.shape and have.ndim == 4 and have.shape[0] == want.shape[0] \
                and have.shape[2:] == want.shape[2:]:
            have = adapt_first_conv(have, want.shape[1])
            adapted.append(key)
        if have.shape != want.shape:
            wrong_shape.append(f"{key} {tuple(have.shape)} for {tuple(want.shape)}")
            continue
        state[key] = have.to(want.dtype)
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} of another shape (first: {wrong_shape[0]})")
        raise CheckpointError(f"{path}: not encoder weights for this encoder (looked like the {layout} layout): "
                              f"{'; '.join(parts)}; check model.encoder matches the network the file came from")
    encoder.load_state_dict(state)
    return EncoderLoad(path, layout, len(state), tuple(adapted), dropped)


def init_from_checkpoint(model: torch.nn.Module, path: str | Path, bands: list[str],
                         classes: list[int]) -> dict[str, Any]:
    """Start ``model`` from the geoseg checkpoint at ``path`` for fine-tuning; return its provenance record.

    The architecture, encoder and its keywords must be the checkpoint's. Every tensor of the same shape is
    copied. For new ``classes`` (ids), the head keeps the rows of the classes both share and starts the new
    ones fresh. For new ``bands`` (names), the first convolution keeps the filter of each band the
    checkpoint knows by name and starts the others at zero (the model first ignores them, then learns
    them); with no band name in common, smp's rule of :func:`adapt_first_conv` applies.
    """
    import torch

    from geoseg._io import file_digest
    from geoseg.models import load_checkpoint

    path = Path(path)
    spec, state = load_checkpoint(path)
    assert state is not None
    target = model.state_dict()
    old_ids = list(spec.classes.ids)
    shared = [(classes.index(c), old_ids.index(c)) for c in classes if c in old_ids]
    first_conv = next((k for k, v in target.items() if v.ndim == 4), None)
    old_bands = spec.band_names
    out: dict[str, torch.Tensor] = {}
    head: list[str] = []
    adapted: list[str] = []
    # The head: smp's segmentation_head, or the fcn's last convolution (weight and bias).
    head_keys = [k for k in target if k.startswith("segmentation_head.")] or list(target)[-2:]
    for key, want in target.items():
        have = state.get(key)
        if have is None:
            raise CheckpointError(f"init: {path}: has no tensor {key}; is it the same architecture and encoder?")
        if key in head_keys and old_ids != classes and want.ndim and want.shape[0] == len(classes) \
                and have.shape[0] == len(old_ids) and have.shape[1:] == want.shape[1:]:
            new = want.clone()  # the new classes' rows keep the fresh initialisation
            for i, j in shared:
                new[i] = have[j]
            out[key] = new
            head.append(key)
        elif key == first_conv and old_bands != bands and have.shape[0] == want.shape[0] \
                and have.shape[2:] == want.shape[2:]:
            common = [(i, old_bands.index(b)) for i, b in enumerate(bands) if b in old_bands]
            if common:
                new = torch.zeros_like(want)
                for i, j in common:
                    new[:, i] = have[:, j]
            else:
                new = adapt_first_conv(have, want.shape[1])
            out[key] = new
            adapted.append(key)
        elif have.shape == want.shape:
            out[key] = have
        else:
            raise CheckpointError(f"init: {path}: {key} is {tuple(have.shape)}, this model's {tuple(want.shape)}; "
                                  "fine-tuning needs the checkpoint's architecture, encoder and arch_kwargs")
    model.load_state_dict(out)
    return {"path": str(path), "sha256": file_digest(path), "classes_kept": [classes[i] for i, _ in shared],
            "classes_new": [c for c in classes if c not in old_ids], "head_tensors": head, "adapted": adapted,
            "bands_kept": [b for b in bands if b in old_bands]}
