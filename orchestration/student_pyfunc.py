"""The student as an MLflow pyfunc model: feature rows in, embeddings out.

``predict(rows, params={"side": "user"})`` encodes user feature rows (the columns of the
``user_features`` table) with the user tower, ``side="item"`` item rows with the item
tower; the output has one row per input row: ``vector`` (float32, flattened as in the
embedding tables), ``shape`` and, when the key column (``user_key`` / ``item_key``) is
given, ``id``. It runs the same exported bundle and the same Arrow-to-tensor conversion as
the embedding job (``orchestration.embeddings``), so its vectors equal the tables'.

Imported only where mlflow is installed (``orchestration.tracking`` logs it).
"""
from __future__ import annotations

import mlflow.pyfunc

SIDES = {"user": ("user_key", "encode_user", "user_input_names"),
         "item": ("item_key", "encode_item", "item_input_names")}


class StudentEmbeddings(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import pyarrow.parquet as pq

        from rec_models.serving.export import load_student

        self.student, self.spec, _ = load_student(context.artifacts["bundle"])
        self.student.eval()
        # the feature tables' Arrow types: MLflow hands over pandas, the towers read Arrow
        self.schema = pq.read_schema(context.artifacts["input_schema"])

    def predict(self, context, model_input, params=None):
        import numpy as np
        import pandas as pd
        import pyarrow as pa
        import torch

        from rec_models.loaders.arrow import arrow_to_tensors

        side = (params or {}).get("side", "user")
        if side not in SIDES:
            raise ValueError(f"params side={side!r}: use 'user' or 'item'")
        key, encode, inputs = SIDES[side]
        columns = list(getattr(self.student, inputs))
        missing = [c for c in columns if c not in model_input.columns]
        if missing:
            raise ValueError(f"{side} rows need the columns {columns}; missing {missing}")
        self.spec.assert_public(columns, "the MLflow student model")
        table = pa.Table.from_pandas(model_input[columns], preserve_index=False)
        table = table.cast(pa.schema([self.schema.field(c) for c in columns]))
        with torch.no_grad():
            vectors = getattr(self.student, encode)(arrow_to_tensors(table, self.spec, columns)).float().numpy()
        shape = list(vectors.shape[1:])
        flat = np.ascontiguousarray(vectors).reshape(len(vectors), -1)
        out = pd.DataFrame({"vector": list(flat), "shape": [shape] * len(flat)})
        if key in model_input.columns:
            out.insert(0, "id", model_input[key].astype(str).to_numpy())
        return out
