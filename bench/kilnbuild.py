"""What the kiln benchmarks share: the release `kiln` binary they measure.

Python 3 standard library only; imported by bench/run.py and bench/images.py (the scripts'
own directory is on sys.path when they run).
"""

import os
import shutil
import subprocess
import time


def release_kiln(repo, path, say, die):
    """The kiln binary to measure: `path` if given (it must be executable), else the release
    build, built with cargo first. Builds are retried for a while, because the tree may be
    mid-edit when a benchmark starts."""
    if path:
        if not os.access(path, os.X_OK):
            die(f"--kiln {path}: not an executable")
        return path
    if not shutil.which("cargo"):
        die("cargo is not on PATH (needed to build kiln; or give --kiln PATH)")
    say("building kiln (cargo build --release -p kiln)")
    for attempt in range(5):
        rc = subprocess.run(["cargo", "build", "--release", "-q", "-p", "kiln"],
                            cwd=repo).returncode
        if rc == 0:
            return os.path.join(repo, "target", "release", "kiln")
        say(f"cargo build failed (attempt {attempt + 1}); retrying in 30 s")
        time.sleep(30)
    die("cargo build --release -p kiln failed")
