"""A pickle payload for the tests of files from elsewhere: what a crafted dataset or checkpoint could hold."""
import os


class MakesFolder:
    """Unpickling this calls os.makedirs(path): a crafted file could make any other call the same way."""

    def __init__(self, path: str) -> None:
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)
