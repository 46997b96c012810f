"""What identifies a model file's content for every cache that outlives one run.

Path, size and mtime alone miss a file replaced by another of the same size whose mtime was kept
(``cp -p``, ``rsync -t``, an unpacked archive): a test saw such a swap give latents that were
neither the old file's nor the new one's, half of the blocks served from the old file's host
copies. A replacement is a new inode, and any write or rename moves ctime, which no tool can set
back, so both are part of the identity. The cost of a false change (a chmod, say) is one re-read.
"""

from __future__ import annotations

import os
from pathlib import Path


def file_identity(path: os.PathLike | str) -> tuple[str, int, int, int, int]:
    """(absolute path, size, mtime_ns, inode, ctime_ns) of ``path``."""
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
