"""FLUX true CFG with given embeddings: prompt and negative embeddings must have the same shape."""

import pytest
import torch

from flux_components import tiny_flux_pipeline


def test_true_cfg_refuses_negative_embeddings_of_another_shape(tmp_path):
    pipe = tiny_flux_pipeline(tmp_path, num_layers=1, num_single_layers=1)
    g = torch.Generator().manual_seed(0)
    inputs = dict(prompt_embeds=torch.randn(1, 4, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g),
                  negative_prompt_embeds=torch.randn(1, 5, 32, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 32, generator=g), height=16, width=16,
                  num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match=r"must have the same shape when passed directly, but got: "
                                         r"`prompt_embeds` \(1, 4, 32\) != `negative_prompt_embeds` \(1, 5, 32\)"):
        pipe(**inputs, true_cfg_scale=2.0)
    assert pipe(**inputs, true_cfg_scale=1.0).images.shape[0] == 1  # no true CFG: the negative is unused
