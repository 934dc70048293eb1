"""Everything this project knows about Label Studio, in one package.

* :mod:`egm.labelstudio.client` - the API client (:class:`LabelStudioClient`): every HTTP call to
  Label Studio goes through it (retries, auth, redaction, the typed records below).
* :mod:`egm.labelstudio.config` - reading a labeling config: where boxes, prompts and
  reasoning go, and the key of the image in ``task.data`` (held once, in ``LabelTarget.image_key``).
* :mod:`egm.labelstudio.results` - boxes -> Label Studio ``result`` items.

The client's names are importable from the package itself (``from egm.labelstudio import
LabelStudioClient``).
"""

from egm.labelstudio import client as _client

#: every public class and function defined in the client module (LabelStudioClient,
#: LabelStudioError, the typed records, ...), re-exported here.
__all__ = sorted(name for name, value in vars(_client).items()
                 if not name.startswith("_") and callable(value) and getattr(value, "__module__", "") == _client.__name__)
globals().update({name: getattr(_client, name) for name in __all__})
