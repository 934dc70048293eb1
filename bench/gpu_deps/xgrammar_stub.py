"""Stand-in for ``xgrammar`` in the vLLM bundle carried to the GPU machine (bench/gpu_deps).

vLLM 0.24 imports its xgrammar structured-output backend when the scheduler loads, and that
module names ``xgrammar`` classes in annotations. The real package (a large native library) is
not carried: the project never asks vLLM for structured output. Every name resolves to a class
that refuses to be built, so an accidental use fails loudly instead of silently.
"""

__version__ = "0+egm.stub"


class _Missing:
    _name = "?"

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"xgrammar.{self._name} is not available: the GPU bundle carries a stub "
                           "(structured outputs are off)")


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    cls = type(name, (_Missing,), {"_name": name})
    globals()[name] = cls
    return cls
