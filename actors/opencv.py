"""OpenCV for the PNG encoder, the watermark and `eval`, loaded through here so that a host without the system
libraries it links says what to install. opencv-python, which invisible-watermark requires, is OpenCV's
desktop build: it loads the system's libGL and glib, which slim containers and Ray's images lack, and without
them every image failed with the loader's bare `libGL.so.1: cannot open shared object file`."""

from __future__ import annotations


class OpenCVUnavailable(ImportError):
    """cv2 is installed but cannot load: a system library it links is missing."""


def load():
    """The cv2 module, imported on first use (the driver reads PNGs and names errors without it)."""
    try:
        import cv2
    except ModuleNotFoundError:
        raise
    except ImportError as exc:
        raise OpenCVUnavailable(
            f"OpenCV cannot load ({exc}): opencv-python, which invisible-watermark requires, needs the system's "
            "libGL and glib; install them (Debian, Ubuntu: apt-get install libgl1 libglib2.0-0; Fedora, RHEL: "
            "dnf install mesa-libGL glib2), as k8s/Dockerfile does") from None  # its words are in ours: one line
    return cv2
