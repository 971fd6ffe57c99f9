"""maskworks: segmentation-mask stages for cryo-ET, multiplexed tissue and volume EM.

The library holds pure array functions (``maskworks.em``, ``maskworks.cryoet``,
``maskworks.codex``) and one I/O module (``maskworks.io``); the Snakemake workflow
and the ``maskworks`` command line call the same functions.
"""

__version__ = "0.1.0"
