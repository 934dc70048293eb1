"""Everything this project knows about Label Studio, in one package.

* :mod:`egm.labelstudio.client` - the API client (:class:`LabelStudioClient`): every HTTP call to
  Label Studio goes through it (retries, auth, redaction, the typed records below).
* :mod:`egm.labelstudio.config` - reading a labeling config: where boxes, prompts and
  reasoning go, and the key of the image in ``task.data`` (held once, in ``LabelTarget.image_key``).
* :mod:`egm.labelstudio.results` - boxes -> Label Studio ``result`` items.

The client's names are importable from the package itself (``from egm.labelstudio import
LabelStudioClient``).
"""

from egm.labelstudio.client import (ExportedAnnotation, ExportedTask, KeyKind, LabelStudioClient, LabelStudioError,
                                    Prediction, PredictionFailure, PredictionWriteReport, Project, TaskRecord, View,
                                    Webhook, key_kind)

__all__ = ["ExportedAnnotation", "ExportedTask", "KeyKind", "LabelStudioClient", "LabelStudioError", "Prediction",
           "PredictionFailure", "PredictionWriteReport", "Project", "TaskRecord", "View", "Webhook", "key_kind"]
