"""Names of the model architectures geoseg builds: plain data, importable without torch.

The configuration validates ``model.architecture`` against this table when it loads; :mod:`geoseg.models`
builds the networks from it.
"""

from __future__ import annotations

#: Registry name (smp's own ``create_model`` key) -> smp class name; ``fcn`` is geoseg's own: a
#: full-resolution stack of 3x3 convolutions (no encoder, output stride 1), not the classic FCN of Long et
#: al. / torchvision's ``fcn_resnet50`` (a backbone, a 1x1 head and bilinear upsampling), which ``pspnet``
#: or ``deeplabv3`` with their own heads supersede (docs/training.md).
ARCHITECTURES: dict[str, str] = {
    "unet": "Unet",
    "unetplusplus": "UnetPlusPlus",
    "fpn": "FPN",
    "pspnet": "PSPNet",
    "deeplabv3": "DeepLabV3",
    "deeplabv3plus": "DeepLabV3Plus",
    "segformer": "Segformer",
    "linknet": "Linknet",
    "manet": "MAnet",
    "pan": "PAN",
    "upernet": "UPerNet",
    "fcn": "geoseg.models:PixelFCN",
}


def check_architecture(name: str) -> str:
    """The registry key of ``name`` (case-insensitive); an unknown name lists the choices."""
    key = name.lower()
    if key not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; available: {', '.join(ARCHITECTURES)}")
    return key
