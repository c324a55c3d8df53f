"""A benchmark's throwaway folders (tracking stores, caches), removed when the benchmark exits:
each store holds whole studies with their models, and left in /tmp they added up to gigabytes."""

import atexit
import shutil
import tempfile


def scratch_folder(prefix: str = "bench-") -> str:
    """A new folder in the system's temporary folder, removed when this process exits."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder
