"""Stage `scan`: every file of every data set with its content digest, as one manifest DVC tracks.

DVC checks a folder dependency file by file: it walks, stats and looks up every raw file in its
state database, about ten times in a run that adds one image (8 s of a one-image change at 20,000
images, growing with the data set). This stage lists each file's path and sha256 instead, taken
through tuneline's stat cache (a file is hashed only when its size, mtime or inode changed), and
`ingest` depends on that list: DVC then hashes one small file. Like `models` it runs on every
`dvc repro` (always_changed), and its output changes only when a file's path or bytes do.
"""

# The modules that decide the manifest's bytes (tuneline.core.codeversion).
CODE = ("stages/scan/stage.py",)
