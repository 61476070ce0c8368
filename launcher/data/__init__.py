"""Data for jobs: fetch sources into a checksummed cache; verify a dataset folder.

Import-light on purpose (gdown, requests, rich and Pillow load inside the functions that use
them), so `launcher --help` stays fast.
"""

from launcher.data.commands import run_fetch_command, run_manifest_command, run_verify_command
from launcher.data.fetch import FetchResult, data_env, fetch_all, fetch_sources
from launcher.data.verify import MANIFEST_NAME, VerifyReport, read_manifest, verify_tree

__all__ = [
    "MANIFEST_NAME",
    "FetchResult",
    "VerifyReport",
    "data_env",
    "fetch_all",
    "fetch_sources",
    "read_manifest",
    "run_fetch_command",
    "run_manifest_command",
    "run_verify_command",
    "verify_tree",
]
