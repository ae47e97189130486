# Copyright 2026 The EmoVLM-KD Authors. Licensed under the Apache License, Version 2.0.
"""`pipeline("image-classification")` for EmoVLM-KD: the stock pipeline, with file paths decoded by the model's
own image processor.

The stock pipeline opens every input with `transformers.image_utils.load_image`, which decodes a file in full before
the image processor sees it: a 10000x10000 JPEG costs about 300 MB of pixels that the model never uses. Handing the
path to `EmoVLMKDImageProcessor` instead reads the size from the header first (refusing images over its
`max_image_pixels`), decodes large JPEGs at reduced scale, and shrinks every image to what the model sees right
after decoding. URLs, base64 strings, PIL images and arrays go the stock way.
"""

import os

from transformers import ImageClassificationPipeline


class EmoVLMKDImageClassificationPipeline(ImageClassificationPipeline):
    def preprocess(self, image, timeout=None):
        if isinstance(image, (str, os.PathLike)) and os.path.isfile(os.fspath(image)):
            model_inputs = self.image_processor(images=os.fspath(image), return_tensors="pt")
            return model_inputs.to(self.dtype)
        return super().preprocess(image, timeout=timeout)


__all__ = ["EmoVLMKDImageClassificationPipeline"]
