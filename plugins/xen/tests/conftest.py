"""Make the xen plugin's tests run from a checkout without installing anything.

``python3 -m pytest plugins/xen/tests`` (repository root) or ``python3 -m
pytest`` (in plugins/xen): the plugin directory, and the repository root for
the core, are put on ``sys.path`` when ``pvcore_xen`` / ``pvcore`` are not importable.
"""

import importlib.util
import sys
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parents[1]
REPO_DIR = PLUGIN_DIR.parents[1]
for needed, directory in (("pvcore", REPO_DIR), ("pvcore_xen", PLUGIN_DIR)):
    if importlib.util.find_spec(needed) is None:
        sys.path.insert(0, str(directory))
