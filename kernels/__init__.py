"""Triton kernels for calibration (installed as vllm_gem.kernels).

This folder sits at the top of the repository, so Python started in the repository root
(`python -m vllm.entrypoints...`, a notebook, `python -c`) can also find it as a bare
`kernels`, a name that belongs to a PyPI package transformers probes for. Imported under
that name it steps aside: the name goes to the installed `kernels` package, or where none is
installed to an empty module with no file, which transformers reads as "not installed".
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _real = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _real  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_real)
    else:
        __file__ = None  # noqa: A001 - no file: importers (transformers) see no installed package
        __path__ = []  # and no submodules: `kernels.moe_gemm` is vllm_gem.kernels.moe_gemm
