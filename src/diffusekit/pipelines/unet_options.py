"""Model options the reference's UNet pipelines expose at pipeline level: FreeU and fused q/k/v."""

from __future__ import annotations

from torch import nn


class UNetOptionsMixin:
    """``enable_freeu`` / ``disable_freeu`` on the ``unet``; ``fuse_qkv_projections`` /
    ``unfuse_qkv_projections`` on the ``unet`` and the ``vae``. Model configuration, not per call."""

    def _component(self, name: str, feature: str) -> nn.Module:
        model = getattr(self, name, None)
        if model is None:
            raise ValueError(f"The pipeline must have `{name}` for using {feature}.")
        return model

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (see :mod:`~diffusekit.models.freeu`): skip features' low frequencies scaled by ``s1`` /
        ``s2``, backbone features by ``b1`` / ``b2`` in the first two up levels."""
        self._component("unet", "FreeU").enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)

    def disable_freeu(self) -> None:
        self._component("unet", "FreeU").disable_freeu()

    def fuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        """One matmul for each attention's q/k/v (or k/v) in the chosen models; outputs stay the same."""
        for name in [n for n, wanted in (("unet", unet), ("vae", vae)) if wanted]:
            self._component(name, "fused projections").fuse_qkv_projections()

    def unfuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        for name in [n for n, wanted in (("unet", unet), ("vae", vae)) if wanted]:
            self._component(name, "fused projections").unfuse_qkv_projections()
