"""What the report scripts' plots share: the output path check and a headless matplotlib."""
import argparse
import os
from pathlib import Path


def plot_path(text: str) -> Path:
    """argparse type: a .png or .pdf path whose folder exists and is writable."""
    path = Path(text)
    if path.suffix.lower() not in (".png", ".pdf"):
        raise argparse.ArgumentTypeError(f"{text}: the plot is written as .png or .pdf; give a file name ending so")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK) or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: cannot write there; give a file in a writable folder")
    return path


def pyplot():
    """matplotlib.pyplot drawing into files only (the Agg backend), so that plots work without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
