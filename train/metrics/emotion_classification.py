"""An `evaluate` metric for single-label emotion classification: accuracy, macro-F1, per-class accuracy and the
confusion matrix in one pass. Loaded by path (`evaluate.load(".../emotion_classification.py")`), so it works
offline, where `evaluate.load("accuracy")` would need the Hub."""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

_DESCRIPTION = "Accuracy, macro-F1, per-class accuracy (recall) and confusion matrix of class predictions."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class indices.
    references (`list[int]`): true class indices.
    num_labels (`int`): number of classes (so absent classes still get a row and column).
Returns:
    accuracy (`float`), macro_f1 (`float`), per_class_accuracy (`list[float | None]`, None for classes absent
    from `references`), confusion_matrix (`list[list[int]]`, rows = true class, columns = predicted class).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EmotionClassification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, num_labels):
        labels = list(range(num_labels))
        matrix = confusion_matrix(references, predictions, labels=labels)
        support = matrix.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = np.diag(matrix) / support
        return {
            "accuracy": float(accuracy_score(references, predictions)),
            # Macro-F1 over the classes that occur (sklearn's default), so absent classes do not count as 0.
            "macro_f1": float(f1_score(references, predictions, average="macro", zero_division=0)),
            "per_class_accuracy": [float(x) if n else None for x, n in zip(per_class, support)],
            "confusion_matrix": matrix.tolist(),
        }
