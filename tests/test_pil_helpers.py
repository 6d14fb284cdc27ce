import numpy as np
import torch
from PIL import Image

from diffusekit import DiffusionPipeline
from diffusekit.utils import numpy_to_pil, pt_to_pil


def test_numpy_to_pil_at_the_reference_places():
    batch = np.zeros((2, 4, 3, 3), dtype=np.float32)
    batch[1] = 1.0
    for convert in (numpy_to_pil, DiffusionPipeline.numpy_to_pil):
        images = convert(batch)
        assert [im.size for im in images] == [(3, 4), (3, 4)] and images[0].mode == "RGB"
        assert images[0].getpixel((0, 0)) == (0, 0, 0) and images[1].getpixel((2, 3)) == (255, 255, 255)
    gray = numpy_to_pil(np.full((4, 3, 1), 0.5, dtype=np.float32))
    assert len(gray) == 1 and gray[0].mode == "L" and gray[0].getpixel((0, 0)) == 128


def test_pt_to_pil_maps_minus_one_to_one():
    images = pt_to_pil(torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3).expand(1, 3, 2, 3))
    assert isinstance(images[0], Image.Image) and images[0].size == (3, 2)
    assert [images[0].getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
