"""wsss_core: the library behind the wsss-flow Snakemake pipeline.

Subpackages: ``data`` (datasets, toy generator, transforms), ``models`` (backbones, DeepLab, weights),
``methods`` (one module per WSSS method, same small interface), ``refine`` (dense CRF),
``store`` (atomic files, sharded HDF5), ``metrics`` (mIoU), ``engine`` (devices, training loop),
``report`` (Markdown/JSON/plots) and ``stages`` (one function per pipeline stage).
"""

__version__ = "0.1.0"
