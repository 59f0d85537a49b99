"""The model as an MLflow pyfunc: images -> embeddings (+ zero-shot labels), texts -> embeddings.

Input: a DataFrame with an `image` column (base64 PNG/JPEG) and/or a `text` column, one item per row.
Params: `classnames` (and optionally `templates`, `{}` for the class name) to get zero-shot labels.
Output: one row per input row: `embedding` (normalized), and for images with class names `label`
and `score`. The artifacts are the open_clip export (config JSON + safetensors): what the model is.
"""

from __future__ import annotations

import base64
import io

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

DEFAULT_TEMPLATES = ["a photo of a {}."]


class EvaClipModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import open_clip

        import evaclip.model  # noqa: F401  (registers our own EVA-02 tower sizes with timm)

        folder = f"local-dir:{context.artifacts['open_clip']}"
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(folder)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(folder)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        import torch
        from PIL import Image

        params = params or {}
        classnames = [c for c in (params.get("classnames") or []) if c]
        templates = list(params.get("templates") or DEFAULT_TEMPLATES)
        rows = []
        with torch.no_grad():
            classifier = None
            if classnames:
                from open_clip import build_zero_shot_classifier

                classifier = build_zero_shot_classifier(self.model, self.tokenizer, classnames, templates)
            for _, row in model_input.iterrows():
                image, text = row.get("image"), row.get("text")
                if isinstance(image, str) and image:
                    pixels = self.preprocess(Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB"))
                    feature = torch.nn.functional.normalize(self.model.encode_image(pixels[None]), dim=-1)[0]
                    result = {"embedding": feature.tolist()}
                    if classifier is not None:
                        scores = (feature @ classifier).softmax(dim=-1)
                        best = int(scores.argmax())
                        result.update(label=classnames[best], score=float(scores[best]))
                elif isinstance(text, str) and text:
                    feature = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer([text])), dim=-1)[0]
                    result = {"embedding": feature.tolist()}
                else:
                    raise ValueError("each row needs an `image` (base64 PNG/JPEG) or a `text`")
                rows.append(result)
        return pd.DataFrame(rows)


def signature() -> ModelSignature:
    inputs = Schema([ColSpec("string", "image", required=False), ColSpec("string", "text", required=False)])
    params = ParamSchema([
        ParamSpec("classnames", "string", [""], shape=(-1,)),
        ParamSpec("templates", "string", DEFAULT_TEMPLATES, shape=(-1,)),
    ])
    return ModelSignature(inputs=inputs, params=params)


def encode_image(path_or_bytes) -> str:
    from pathlib import Path

    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return base64.b64encode(data).decode()
